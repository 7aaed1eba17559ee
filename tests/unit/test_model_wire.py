"""The model's encoding on the Flower wire (consortium/model_wire.py): one safetensors
array whatever the model, the same tensors out as in, and a typed refusal for anything
else a site or the coordinator might be sent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from consortium.model_wire import (
    PACKED_ARRAY,
    PACKED_STYPE,
    ModelWireError,
    pack_tensors,
    unpack_tensors,
    unpack_torch,
)
from consortium.models.bytelm import ByteLM
from consortium.models.bytelm_config import ByteLMConfig
from consortium.tensor_digest import arrays_digest


def mixed_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "layer.weight": rng.standard_normal((5, 3)).astype(np.float32),
        "layer.bias": np.array([-0.0, np.inf, np.nan], dtype=np.float32),
        "half": rng.standard_normal(4).astype(np.float16),
        "steps": np.array(7, dtype=np.int64),  # 0-d
        "mask": np.array([True, False]),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "strided": rng.standard_normal((4, 4)).astype(np.float64)[:, ::2],  # not contiguous
    }


def test_the_tensors_come_out_bit_for_bit_with_the_same_digest() -> None:
    sent = mixed_tensors()
    received = unpack_tensors(pack_tensors(sent))
    assert list(received) == sorted(sent)
    for name, array in sent.items():
        assert received[name].dtype == array.dtype, name
        assert received[name].shape == array.shape, name
        assert received[name].tobytes() == array.tobytes(order="C"), name
        assert received[name].flags.writeable, name  # a model may copy into or from it
    assert arrays_digest(received) == arrays_digest(sent)


def test_torch_tensors_cross_as_their_values() -> None:
    model = ByteLM(ByteLMConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))
    sent = {name: p.detach() for name, p in model.named_parameters()}
    received = unpack_torch(pack_tensors(sent))
    assert set(received) == set(sent)
    for name, tensor in sent.items():
        assert torch.equal(received[name], tensor), name


def test_a_message_is_four_flower_objects_whatever_the_model() -> None:
    """Each Flower object is one request to the SuperLink: Flower's own record is two
    objects per (distinct) tensor, the Array and its chunk."""
    rng = np.random.default_rng(5)
    tensors = {f"layer{i}.weight": rng.standard_normal((8, 4)) for i in range(30)}

    def objects(record: ArrayRecord) -> int:
        return len(get_all_nested_objects(RecordDict({"arrays": record})))

    assert objects(pack_tensors(tensors)) == 4  # record dict, array record, array, chunk
    assert objects(ArrayRecord({k: Array(v) for k, v in tensors.items()})) == 2 * len(tensors) + 2


def _packed(data: bytes, stype: str = PACKED_STYPE) -> ArrayRecord:
    return ArrayRecord(
        {PACKED_ARRAY: Array(dtype="uint8", shape=(len(data),), stype=stype, data=data)}
    )


@pytest.mark.parametrize(
    ("record", "says"),
    [
        (ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}), "not the one 'tensors'"),
        (
            ArrayRecord(
                {
                    PACKED_ARRAY: pack_tensors({"w": np.zeros(1)})[PACKED_ARRAY],
                    "extra": Array(np.zeros(1)),
                }
            ),
            "not the one 'tensors'",
        ),
        (_packed(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"), "not safetensors"),
        (_packed(b"short"), "not safetensors"),
        (_packed(pack_tensors({"w": np.zeros(1)})[PACKED_ARRAY].data, "numpy.ndarray"), "'numpy"),
    ],
    ids=["flower-per-tensor", "two-arrays", "bad-header", "truncated", "other-stype"],
)
def test_anything_else_is_refused_with_a_typed_error(record: ArrayRecord, says: str) -> None:
    with pytest.raises(ModelWireError, match=says):
        unpack_tensors(record)


def test_a_record_beside_the_model_is_untouched() -> None:
    """Only the model record changes encoding: config records travel as before."""
    content = RecordDict({"arrays": pack_tensors({"w": np.ones(3)}), "config": ConfigRecord({})})
    assert set(content.array_records) == {"arrays"}
    assert set(content.config_records) == {"config"}
