"""How a model's named tensors cross Flower: one safetensors Array per message.

Flower 1.41 moves every Array of a message as objects of their own (the Array and each
of its chunks), and the SuperLink serves each object as one authenticated request with
several SQL statements. Sent as Flower's `ArrayRecord(state_dict)`, the record of a
model of 8 tensors was 17 objects, and of a LoRA adapter set 193; packed into one
safetensors buffer it is 3 whatever the model (the record, the Array, one chunk per
5 MiB). On a two-site, 10-round digits job the SuperLink's CPU time fell from 18.9 to
8.4 s (docs/protocol.md; benchmarks/model_wire.py counts the objects per model).

safetensors is a JSON header and raw little-endian bytes, parsed without pickle, so a
message from another institution is read as tensors and nothing else. Digests and
signatures cover the tensors by name (`consortium.tensor_digest`), never this encoding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import Array, ArrayRecord
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from consortium.errors import InvalidArgumentError

ARRAYS_RECORD = "arrays"  # the message's record that carries the model
PACKED_ARRAY = "tensors"  # the record's one Array
PACKED_STYPE = "safetensors"  # that Array's serialisation type

Tensors = dict[str, npt.NDArray[Any]]


class ModelWireError(InvalidArgumentError):
    """A message's model record is not one safetensors Array of named tensors."""


def pack_tensors(tensors: Mapping[str, npt.NDArray[Any] | torch.Tensor]) -> ArrayRecord:
    """The record that carries `tensors` (torch tensors are sent as their numpy view)."""
    arrays = {
        # order="C", not ascontiguousarray, which makes a 0-d array 1-d
        name: np.asarray(
            tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else tensor,
            order="C",
        )
        for name, tensor in tensors.items()
    }
    data = save_safetensors(arrays)
    return ArrayRecord(
        {PACKED_ARRAY: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)}
    )


def unpack_tensors(record: ArrayRecord) -> Tensors:
    """The named tensors a packed record carries; ModelWireError for anything else."""
    if list(record.keys()) != [PACKED_ARRAY]:
        raise ModelWireError(
            f"the model record holds {sorted(record.keys())}, not the one {PACKED_ARRAY!r} "
            "array of this protocol"
        )
    array = record[PACKED_ARRAY]
    if array.stype != PACKED_STYPE:
        raise ModelWireError(f"the model array is {array.stype!r}, not {PACKED_STYPE!r}")
    try:
        tensors = load_safetensors(bytes(array.data))
    except (SafetensorError, ValueError, TypeError) as err:
        raise ModelWireError(f"the model array is not safetensors: {err}") from None
    return {name: tensors[name] for name in sorted(tensors)}  # whatever the packing order


def unpack_torch(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """As `unpack_tensors`, as torch tensors (sharing the unpacked arrays' memory)."""
    return {name: torch.from_numpy(array) for name, array in unpack_tensors(record).items()}
