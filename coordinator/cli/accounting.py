"""`coordinator accounting`: compute each institution contributed to pretraining jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from consortium.cli_errors import cli_errors
from consortium.console import plain_console
from consortium.errors import NotFoundError
from coordinator.pretraining.accounting_files import accounting_path, read_accounting

console = plain_console()


def accounting(
    job: Annotated[str | None, typer.Option("--job", help="Only this job id.")] = None,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Coordinator data dir (state, models, logs).")
    ] = Path(".consortium"),
) -> None:
    """CPU- and GPU-seconds each institution gave to and used of each pretraining job."""
    with cli_errors():
        jobs = read_accounting(data_dir, job)
        if job is not None and not jobs:
            raise NotFoundError(
                f"no accounting for job {job}: {accounting_path(data_dir, job)} does not exist "
                "(only pretraining jobs that completed an outer step have one)"
            )
        table = Table(
            "job",
            "institution",
            "cpu s given",
            "gpu s given",
            "share",
            "cpu s used",
            "gpu s used",
            "outer steps",
            "tokens",
        )
        for entry in jobs:
            for name, contribution in entry["institutions"].items():
                table.add_row(
                    entry["job_id"],
                    name,
                    f"{contribution['cpu_s']:.1f}",
                    f"{contribution['gpu_s']:.1f}",
                    f"{contribution['share']:.0%}",
                    f"{contribution.get('consumed_cpu_s', 0.0):.1f}",
                    f"{contribution.get('consumed_gpu_s', 0.0):.1f}",
                    str(contribution["outer_steps"]),
                    str(contribution["tokens"]),
                )
        console.print(table)
