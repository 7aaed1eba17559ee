"""Per-job compute accounting on disk: `<data dir>/accounting/<job id>.json`.

Written by the pretraining runner after every outer step and at the end of a job
(from `coordinator.pretraining.accounting`), read by `coordinator accounting`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.data_dir import DataDir

if TYPE_CHECKING:  # importing coordinator.pretraining imports Ray; the CLI only reads JSON
    from coordinator.pretraining import JobAccounting


def accounting_dir(data_dir: Path) -> Path:
    return DataDir(data_dir).accounting_dir


def accounting_path(data_dir: Path, job_id: str) -> Path:
    return DataDir(data_dir).accounting_file(job_id)


def accounting_to_json(job_id: str, accounting: JobAccounting) -> dict[str, Any]:
    shares = accounting.shares()
    return {
        "job_id": job_id,
        "job_name": accounting.job,
        "cpu_s": accounting.cpu_s,
        "gpu_s": accounting.gpu_s,
        "institutions": {
            name: {
                "cpu_s": c.cpu_s,
                "gpu_s": c.gpu_s,
                "consumed_cpu_s": c.consumed_cpu_s,
                "consumed_gpu_s": c.consumed_gpu_s,
                "share": shares[name],
                "outer_steps": c.outer_steps,
                "inner_steps": c.inner_steps,
                "tokens": c.tokens,
                "bytes_sent": c.bytes_sent,
                "bytes_received": c.bytes_received,
                "workers": sorted(c.workers),
            }
            for name, c in accounting.institutions.items()
        },
    }


def write_accounting(data_dir: Path, job_id: str, accounting: JobAccounting) -> Path:
    """Replace the job's accounting file atomically."""
    path = accounting_path(data_dir, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(accounting_to_json(job_id, accounting), indent=2) + "\n")
    os.replace(partial, path)
    return path


def read_accounting(data_dir: Path, job_id: str | None = None) -> list[dict[str, Any]]:
    """The accounting of one job, or of every job that has one (by job id)."""
    if job_id is not None:
        paths = [accounting_path(data_dir, job_id)]
    else:
        paths = sorted(accounting_dir(data_dir).glob("*.json"))
    return [json.loads(path.read_text()) for path in paths if path.exists()]
