"""How a pseudo-gradient travels: float32, float16, or int8 with blockwise scales.

A pretraining job names its codec in the spec (`pseudo_gradient_codec`); a worker
encodes its pseudo-gradient (``global - local``) with it before sending, and the
coordinator decodes what it received before averaging. The encoded form is a flat dict
of named arrays, so it is digested (`arrays_digest`: the logged
``pseudo_gradient_digest`` is of what was sent) and packed (safetensors) like any
weights, and replay re-encodes its own result and compares the same digest.

* ``fp32``: the arrays as they are (4 bytes per value; logs from before the codec
  existed are this).
* ``fp16``: each array cast to float16, round to nearest even (2 bytes per value).
* ``int8``: each array cut, in C order, into blocks of `INT8_BLOCK` values; each block
  is sent as int8 values ``rint(x / s)`` with ``s = max|x| / 127`` (float32, one per
  block, in ``<name>@scales``), decoded as ``q * s``: 1 + 4/64 bytes per value, 3.76x
  fewer than fp32, with an error of at most half a step of each block's own scale.

Every operation is IEEE float32 arithmetic that rounds exactly (division,
multiplication, rint, max), so encoding and decoding give the same bits on every
machine, which replay needs. What a worker sent is untrusted: `decode` refuses
anything but the exact layout of its codec (names, dtypes, shapes, finite non-negative
scales) with `PseudoGradientEncodingError`, before any of it reaches the average.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from consortium.errors import InvalidArgumentError

Codec = Literal["fp32", "fp16", "int8"]
CODECS: tuple[Codec, ...] = get_args(Codec)
INT8_BLOCK = 64  # values per scale: part of the "int8" codec, fixed so replays agree
SCALES_SUFFIX = "@scales"
_INT8_MAX = np.float32(127.0)

Encoded = dict[str, npt.NDArray[Any]]


class PseudoGradientEncodingError(InvalidArgumentError, ValueError):
    """What a worker sent is not a pseudo-gradient in the job's codec."""


def encode(pseudo_gradient: Mapping[str, npt.NDArray[np.float32]], codec: Codec) -> Encoded:
    """The arrays a worker sends for `pseudo_gradient` (float32 arrays) under `codec`."""
    if codec == "fp32":
        return {
            name: np.asarray(array, np.float32, order="C")
            for name, array in pseudo_gradient.items()
        }
    if codec == "fp16":
        return {
            name: np.asarray(array, np.float32).astype(np.float16)
            for name, array in pseudo_gradient.items()
        }
    if codec == "int8":
        encoded: Encoded = {}
        for name, array in pseudo_gradient.items():
            values, scales = _quantize(np.asarray(array, np.float32, order="C"))
            encoded[name] = values
            encoded[name + SCALES_SUFFIX] = scales
        return encoded
    raise ValueError(f"unknown pseudo-gradient codec {codec!r}; one of {', '.join(CODECS)}")


def decode(
    encoded: Mapping[str, npt.NDArray[Any]], codec: Codec
) -> dict[str, npt.NDArray[np.float32]]:
    """The float32 pseudo-gradient `encoded` stands for; refuses any other layout."""
    if not isinstance(encoded, Mapping) or not all(isinstance(k, str) for k in encoded):
        raise PseudoGradientEncodingError(
            f"a pseudo-gradient is named arrays, got {type(encoded).__name__}"
        )
    if codec == "fp32":
        return {name: _expect(name, array, np.float32) for name, array in encoded.items()}
    if codec == "fp16":
        return {
            name: _expect(name, array, np.float16).astype(np.float32)
            for name, array in encoded.items()
        }
    if codec == "int8":
        return _decode_int8(encoded)
    raise ValueError(f"unknown pseudo-gradient codec {codec!r}; one of {', '.join(CODECS)}")


def encoded_nbytes(encoded: Mapping[str, npt.NDArray[Any]]) -> int:
    """Bytes of the arrays sent (what accounting and benchmarks count)."""
    return sum(int(array.nbytes) for array in encoded.values())


def _blocks(size: int) -> int:
    return -(-size // INT8_BLOCK)


def _quantize(
    array: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    flat = array.reshape(-1)
    padded = np.zeros(_blocks(flat.size) * INT8_BLOCK, np.float32)
    padded[: flat.size] = flat
    blocks = padded.reshape(-1, INT8_BLOCK)
    scales = (np.abs(blocks).max(axis=1) / _INT8_MAX).astype(np.float32)
    divisors = np.where(scales > 0, scales, np.float32(1.0))  # an all-zero block stays 0
    values = np.clip(np.rint(blocks / divisors[:, None]), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return values.reshape(-1)[: flat.size].reshape(array.shape), scales


def _decode_int8(encoded: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[np.float32]]:
    names = sorted(name for name in encoded if not name.endswith(SCALES_SUFFIX))
    expected = {*names, *(name + SCALES_SUFFIX for name in names)}
    if set(encoded) != expected:
        odd = sorted(set(encoded) ^ expected)
        raise PseudoGradientEncodingError(
            f"int8 pseudo-gradient: every tensor needs exactly its {SCALES_SUFFIX} array; "
            f"unmatched: {', '.join(odd[:5])}"
        )
    decoded: dict[str, npt.NDArray[np.float32]] = {}
    for name in names:
        values = _expect(name, encoded[name], np.int8)
        scales = _expect(name + SCALES_SUFFIX, encoded[name + SCALES_SUFFIX], np.float32)
        if scales.shape != (_blocks(values.size),):
            raise PseudoGradientEncodingError(
                f"int8 pseudo-gradient {name!r}: {values.size} values need "
                f"{_blocks(values.size)} block scales, got shape {scales.shape}"
            )
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise PseudoGradientEncodingError(
                f"int8 pseudo-gradient {name!r}: block scales must be finite and non-negative"
            )
        padded = np.zeros(scales.size * INT8_BLOCK, np.float32)
        padded[: values.size] = values.reshape(-1)
        restored = padded.reshape(-1, INT8_BLOCK) * scales[:, None]
        decoded[name] = restored.reshape(-1)[: values.size].reshape(values.shape)
    return decoded


def _expect(name: str, array: Any, dtype: type[np.generic]) -> npt.NDArray[Any]:
    if not isinstance(array, np.ndarray) or array.dtype != np.dtype(dtype):
        found = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise PseudoGradientEncodingError(
            f"pseudo-gradient {name!r} is {found}, the job's codec sends {np.dtype(dtype)}"
        )
    return array
