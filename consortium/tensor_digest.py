"""Content digests of named tensors, identical on every machine.

sha256 over, for each tensor in sorted name order: the name, the dtype (numpy
`str`, byte order explicit), the shape and the C-order bytes, each length
prefixed. Two models have the same digest exactly when they hold the same names,
dtypes, shapes and bits.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt


def _field(hasher: Any, data: bytes) -> None:
    hasher.update(struct.pack(">Q", len(data)))
    hasher.update(data)


def arrays_digest(arrays: Mapping[str, npt.NDArray[Any]]) -> str:
    hasher = hashlib.sha256(b"consortium-arrays-v1")
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        _field(hasher, name.encode())
        _field(hasher, little.dtype.str.encode())
        _field(hasher, ",".join(str(d) for d in array.shape).encode())
        _field(hasher, little.tobytes())
    return hasher.hexdigest()


def file_digest(path: str) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()
