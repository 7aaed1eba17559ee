"""Data commitments: what a site proves about its data without revealing it.

commitment = HMAC-SHA256(site key, sha256(record_0) || ... || sha256(record_n-1))
where record_i is example i's bytes and label. With the count and a digest of
the schema (dtypes and per-example shapes) it pins down exactly which data a
site trained on; the key, which stays at the site, stops anyone from testing
guesses of individual records against it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from consortium.provenance.canonical import canonical_json

KEY_BYTES = 32


@dataclass(frozen=True)
class DataCommitment:
    dataset: str
    count: int
    schema_digest: str
    commitment: str

    def digest(self) -> str:
        """One string that the signed update statement carries."""
        return hashlib.sha256(canonical_json(self.as_dict())).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "count": self.count,
            "schema_digest": self.schema_digest,
            "commitment": self.commitment,
        }


def load_or_create_key(path: Path) -> bytes:
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.urandom(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    return key


def commit(dataset: str, x: npt.NDArray[Any], y: npt.NDArray[Any], key: bytes) -> DataCommitment:
    schema = canonical_json(
        {"x": [x.dtype.str, list(x.shape[1:])], "y": [y.dtype.str, list(y.shape[1:])]}
    )
    mac = hmac.new(key, digestmod=hashlib.sha256)
    xs, ys = np.ascontiguousarray(x), np.ascontiguousarray(y)
    for i in range(len(ys)):
        mac.update(hashlib.sha256(xs[i].tobytes() + ys[i].tobytes()).digest())
    return DataCommitment(
        dataset=dataset,
        count=len(ys),
        schema_digest=hashlib.sha256(schema).hexdigest(),
        commitment=mac.hexdigest(),
    )
