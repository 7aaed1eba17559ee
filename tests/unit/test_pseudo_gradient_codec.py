"""Pseudo-gradient codecs (consortium/pseudo_gradient_codec.py): what each sends, how
close int8 comes back, the same bits every time, and the refusal of anything a worker
sends in another layout."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from consortium.lm import model_weights
from consortium.models.bytelm import ByteLM, ByteLMConfig
from consortium.pseudo_gradient_codec import (
    CODECS,
    INT8_BLOCK,
    SCALES_SUFFIX,
    Codec,
    PseudoGradientEncodingError,
    decode,
    encode,
    encoded_nbytes,
)
from consortium.tensor_digest import arrays_digest


def pseudo_gradient(seed: int = 0) -> dict[str, npt.NDArray[np.float32]]:
    """Tensors of the shapes a model has, and the awkward ones: a scalar, an empty
    tensor, sizes that are not a multiple of the block, and an all-zero tensor."""
    rng = np.random.default_rng(seed)
    return {
        "blocks.0.weight": (rng.standard_normal((48, 32)) * 1e-3).astype(np.float32),
        "bias": rng.standard_normal(70).astype(np.float32),
        "scalar": np.asarray(rng.standard_normal(), np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "zeros": np.zeros(130, np.float32),
        "spiky": np.concatenate([np.full(63, 1e-6), [5.0], np.full(10, -2e-6)]).astype(np.float32),
    }


def test_fp32_sends_the_arrays_as_they_are() -> None:
    original = pseudo_gradient()
    sent = encode(original, "fp32")
    assert arrays_digest(sent) == arrays_digest(original)  # logs from before codecs match
    assert arrays_digest(decode(sent, "fp32")) == arrays_digest(original)


def test_fp16_halves_the_bytes_and_rounds_to_nearest() -> None:
    original = pseudo_gradient()
    sent = encode(original, "fp16")
    assert all(a.dtype == np.float16 for a in sent.values())
    assert encoded_nbytes(sent) * 2 == encoded_nbytes(original)
    for name, back in decode(sent, "fp16").items():
        assert back.dtype == np.float32 and back.shape == original[name].shape
        np.testing.assert_array_equal(back, original[name].astype(np.float16).astype(np.float32))


def test_int8_keeps_every_value_within_half_a_step_of_its_blocks_scale() -> None:
    original = pseudo_gradient()
    sent = encode(original, "int8")
    assert set(sent) == {*original, *(name + SCALES_SUFFIX for name in original)}
    back = decode(sent, "int8")
    for name, array in original.items():
        assert back[name].dtype == np.float32 and back[name].shape == array.shape
        flat = array.reshape(-1)
        blocks = -(-flat.size // INT8_BLOCK)
        padded = np.zeros(blocks * INT8_BLOCK, np.float32)
        padded[: flat.size] = flat
        step = np.abs(padded.reshape(blocks, INT8_BLOCK)).max(axis=1) / 127
        bound = np.repeat(step * (0.5 + 1e-4), INT8_BLOCK)[: flat.size]  # float32 rounding
        assert (np.abs(back[name].reshape(-1) - flat) <= bound).all(), name
    np.testing.assert_array_equal(back["zeros"], original["zeros"])
    assert back["spiky"][63] == np.float32(5.0)  # a block's largest value comes back exact
    # A spike costs only its own block: the next block keeps its small values.
    assert back["spiky"][64] != 0 and abs(back["spiky"][64] - original["spiky"][64]) < 1e-7


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=70),
        elements=st.floats(-(2.0**100), 2.0**100, width=32),
    )
)
def test_int8_round_trip_is_bounded_and_the_same_bits_each_time(array: Any) -> None:
    sent = encode({"t": array}, "int8")
    assert arrays_digest(sent) == arrays_digest(encode({"t": array.copy()}, "int8"))
    back = decode(sent, "int8")["t"]
    assert back.shape == array.shape and np.isfinite(back).all()
    if array.size:
        # Half a step of the largest scale, float32 rounding, and what a block smaller
        # than float32 can scale (its scale underflows: below 1e-36, sent as zeros).
        largest = float(np.abs(array).max())
        assert np.abs(back - array).max() <= largest * (1 / 254 + 1e-6) + 1.2e-36


def test_int8_sends_over_3_5_times_fewer_bytes_than_fp32_for_a_model() -> None:
    weights = model_weights(ByteLM(ByteLMConfig()))
    fp32, int8 = (encoded_nbytes(encode(weights, codec)) for codec in ("fp32", "int8"))
    assert fp32 / int8 > 3.5
    assert encoded_nbytes(encode(weights, "fp16")) * 2 == fp32


def refused(codec: Codec, sent: dict[str, Any], match: str) -> None:
    with pytest.raises(PseudoGradientEncodingError, match=match):
        decode(sent, codec)


def test_decode_refuses_any_other_layout() -> None:
    good = encode(pseudo_gradient(), "int8")
    refused("int8", {k: v for k, v in good.items() if k != "bias" + SCALES_SUFFIX}, "unmatched")
    refused("int8", {**good, "extra" + SCALES_SUFFIX: np.ones(1, np.float32)}, "unmatched")
    refused("int8", {**good, "bias": good["bias"].astype(np.int16)}, "int16, the job's codec")
    refused("int8", {**good, "bias" + SCALES_SUFFIX: np.ones(1, np.float32)}, "need 2 block")
    for bad in (np.nan, np.inf, -1.0):
        scales = good["bias" + SCALES_SUFFIX].copy()
        scales[0] = bad
        refused("int8", {**good, "bias" + SCALES_SUFFIX: scales}, "finite and non-negative")
    original = pseudo_gradient()
    refused("fp32", encode(original, "fp16"), "float16, the job's codec sends float32")
    refused("fp16", original, "float32, the job's codec sends float16")
    refused("fp32", {"bias": [1.0, 2.0]}, "list")
    refused("int8", None, "named arrays, got NoneType")
    refused("fp32", {1: np.zeros(1, np.float32)}, "named arrays")


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_names_itself_in_the_spec(codec: Codec) -> None:
    from coordinator.pretraining.spec import validate_pretrain_spec

    spec = validate_pretrain_spec(
        {"name": "c", "inner_steps": 1, "outer_steps": 1, "pseudo_gradient_codec": codec}
    )
    assert spec.pseudo_gradient_codec == codec
    assert spec.training_identity()["pseudo_gradient_codec"] == codec
