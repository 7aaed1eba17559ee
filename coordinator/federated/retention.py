"""Retained client updates, kept so anyone can replay the aggregation later.

Layout: <data dir>/provenance/updates/<job>/<round>/<update digest>.safetensors
with the example count in the file's metadata. Retention is a job setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file, save_file

from coordinator.data_dir import DataDir


def updates_dir(data_dir: Path, job_id: str, round_: int) -> Path:
    return DataDir(data_dir).retained_updates(job_id, round_)


def retain(
    data_dir: Path,
    job_id: str,
    round_: int,
    digest: str,
    arrays: dict[str, npt.NDArray[Any]],
    num_examples: int,
) -> Path:
    path = updates_dir(data_dir, job_id, round_) / f"{digest}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(
        {k: np.asarray(v, order="C") for k, v in arrays.items()},  # 0-d stays 0-d
        str(partial),
        {"num_examples": str(num_examples)},
    )
    os.replace(partial, path)
    return path


def load_retained(path: Path) -> dict[str, npt.NDArray[Any]]:
    return dict(load_file(str(path)))
