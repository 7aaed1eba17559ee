"""Atomic DiLoCo checkpoints: global weights, outer optimizer, step index, RNG state.

One file, ``<checkpoint_dir>/latest.pt``, replaced atomically after every outer step:
written to a temporary file in the same directory, fsynced, then ``os.replace``d (and
the directory fsynced), so a crash leaves either the previous or the new checkpoint,
never a torn one. It loads with ``torch.load(weights_only=True)``: tensors, numbers and
strings only, no pickled code. Structured metadata is stored as JSON strings.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coordinator.pretraining.records import OuterStepRecord

FORMAT = "consortium-diloco-checkpoint-v1"
LATEST = "latest.pt"


@dataclass(frozen=True)
class Checkpoint:
    step: int  # outer steps completed
    model: dict[str, torch.Tensor]
    outer_optimizer: dict[str, Any]  # torch.optim.SGD.state_dict()
    rng_state: dict[str, Any]  # numpy PCG64 state that draws the step seeds
    training_identity: dict[str, Any]  # PretrainJobSpec.training_identity()
    model_digest: str
    corpus_digest: str
    records: tuple[OuterStepRecord, ...]


def checkpoint_path(directory: Path) -> Path:
    return directory / LATEST


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "step": checkpoint.step,
        "model": {name: t.detach().cpu().clone() for name, t in checkpoint.model.items()},
        "outer_optimizer": checkpoint.outer_optimizer,
        "rng_state": json.dumps(checkpoint.rng_state),
        "training_identity": json.dumps(checkpoint.training_identity, sort_keys=True),
        "model_digest": checkpoint.model_digest,
        "corpus_digest": checkpoint.corpus_digest,
        "records": json.dumps([r.to_dict() for r in checkpoint.records]),
    }
    target = checkpoint_path(directory)
    fd, tmp_name = tempfile.mkstemp(prefix=".latest-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The latest checkpoint in ``directory``, or None when there is none yet.

    Where `coordinator serve` runs as root, the run's driver (the pool user) writes the
    checkpoint dir, and the coordinator reads it back on a resume: so the file is opened
    without following a link (a link to root's files), without waiting on a FIFO (a
    reader that never returns), and must be a regular file. Its content is parsed by
    torch's restricted unpickler (``weights_only``), which builds tensors and plain
    containers only."""
    path = checkpoint_path(directory)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ValueError(f"{path} is not a checkpoint file: {error.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        payload = torch.load(handle, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a DiLoCo checkpoint ({payload.get('format')!r})")
    return Checkpoint(
        step=int(payload["step"]),
        model=dict(payload["model"]),
        outer_optimizer=payload["outer_optimizer"],
        rng_state=json.loads(payload["rng_state"]),
        training_identity=json.loads(payload["training_identity"]),
        model_digest=str(payload["model_digest"]),
        corpus_digest=str(payload["corpus_digest"]),
        records=tuple(OuterStepRecord.from_dict(r) for r in json.loads(payload["records"])),
    )
