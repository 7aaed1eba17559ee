"""Data commitments: what a site proves about its data without revealing it.

commitment = HMAC-SHA256(site key, sha256(record_0) || ... || sha256(record_n-1))
where record_i is example i's bytes and label (for text: its i-th line). With
the count and a digest of the schema (dtypes and per-example shapes) it pins
down exactly which data a site trained on; the key, which stays at the site,
stops anyone from testing guesses of individual records against it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
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
    """Commit to labelled examples: record i is example i's bytes and its label's."""
    schema = {"x": [x.dtype.str, list(x.shape[1:])], "y": [y.dtype.str, list(y.shape[1:])]}
    xs, ys = np.ascontiguousarray(x), np.ascontiguousarray(y)
    return commit_records(
        dataset, (xs[i].tobytes() + ys[i].tobytes() for i in range(len(ys))), schema, key
    )


def commit_text(dataset: str, text: bytes, key: bytes) -> DataCommitment:
    """Commit to a text corpus: record i is its i-th line (without the newline)."""
    return commit_records(dataset, text.split(b"\n"), {"text": "lines"}, key)


def commit_records(
    dataset: str, records: Iterable[bytes], schema: dict[str, Any], key: bytes
) -> DataCommitment:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    count = 0
    for record in records:
        mac.update(hashlib.sha256(record).digest())
        count += 1
    return DataCommitment(
        dataset=dataset,
        count=count,
        schema_digest=hashlib.sha256(canonical_json(schema)).hexdigest(),
        commitment=mac.hexdigest(),
    )
