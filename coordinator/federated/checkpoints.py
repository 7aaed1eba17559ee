"""Per-round checkpoints of a federated job's global model (safetensors).

After every completed round the ServerApp writes the global model here, so a
coordinator restarted on the same data dir resumes from the last committed round.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from coordinator.data_dir import DataDir


@dataclass(frozen=True)
class Checkpoint:
    round: int
    state_dict: dict[str, torch.Tensor]


def save_model(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically: a crash never leaves a half-written model behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(partial), metadata)
    os.replace(partial, path)


class CheckpointStore:
    """One file per round (`round-<n>.safetensors`). A round's checkpoint is written
    before the round is committed (logged), so a crash between the two leaves a
    checkpoint ahead of the log; resuming loads the last committed round's own file,
    and files older than it are pruned once a newer round is committed."""

    def __init__(self, data_dir: Path, job_id: str) -> None:
        self._dir = DataDir(data_dir).checkpoints(job_id)

    def _file(self, round_: int) -> Path:
        return self._dir / f"round-{round_}.safetensors"

    def save(self, round_: int, state_dict: dict[str, torch.Tensor]) -> None:
        save_model(self._file(round_), state_dict, {"round": str(round_)})

    def at(self, round_: int) -> Checkpoint | None:
        path = self._file(round_)
        if not path.exists():
            return None
        return Checkpoint(round=round_, state_dict=load_file(str(path)))

    def prune_before(self, round_: int) -> None:
        """Drop the files of rounds before `round_` (committed past them)."""
        for path in self._dir.glob("round-*.safetensors"):
            number = path.name.removeprefix("round-").removesuffix(".safetensors")
            if number.isdigit() and int(number) < round_:
                path.unlink(missing_ok=True)
