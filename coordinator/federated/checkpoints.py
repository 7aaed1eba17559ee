"""Per-round checkpoints of a federated job's global model (safetensors).

After every completed round the ServerApp writes the global model here, so a
coordinator restarted on the same data dir resumes from the last completed round.
"""

from __future__ import annotations

import json
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
    def __init__(self, data_dir: Path, job_id: str) -> None:
        self._dir = DataDir(data_dir).checkpoints(job_id)

    @property
    def _model(self) -> Path:
        return self._dir / "latest.safetensors"

    @property
    def _meta(self) -> Path:
        return self._dir / "latest.json"

    def save(self, round_: int, state_dict: dict[str, torch.Tensor]) -> None:
        save_model(self._model, state_dict, {"round": str(round_)})
        partial = self._meta.with_suffix(".partial")
        partial.write_text(json.dumps({"round": round_}))
        os.replace(partial, self._meta)

    def latest(self) -> Checkpoint | None:
        if not self._meta.exists() or not self._model.exists():
            return None
        round_ = int(json.loads(self._meta.read_text())["round"])
        return Checkpoint(round=round_, state_dict=load_file(str(self._model)))
