"""`coordinator replay`: reproduce a job bit for bit, from the log or from an attestation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from consortium.cli_errors import cli_errors
from consortium.errors import InvalidArgumentError
from consortium.provenance.records import Record
from consortium.startup import imports_without_gc
from coordinator.cli.provenance import (
    DataDirOption,
    KeyOption,
    UnboundOption,
    console,
    job_records,
    load_attestation,
    load_verified,
)

if TYPE_CHECKING:
    from coordinator.pretraining.replay import StepReplay


def replay(
    job_id: Annotated[
        str | None, typer.Argument(help="The job (omit with --from-attestation).")
    ] = None,
    data_dir: DataDirOption = Path(".consortium"),
    key: KeyOption = None,
    allow_unbound_keys: UnboundOption = False,
    from_attestation: Annotated[
        Path | None,
        typer.Option(help="Re-run a pretraining job from its attestation alone (with --ca)."),
    ] = None,
    ca: Annotated[
        Path | None, typer.Option(help="The consortium's CA certificate, for --from-attestation.")
    ] = None,
) -> None:
    """Verify the log, then reproduce the job bit for bit: a federated job's aggregates
    from retained updates; a pretraining job's training, step by step, on this CPU
    (also from its attestation alone, on any machine)."""
    # Imported here: aggregation pulls in Flower and numpy, which `verify` and `show`
    # do not need, and every `coordinator` command would pay for at start-up. Paused
    # and frozen as at start-up (consortium/startup.py).
    with imports_without_gc():
        from coordinator.federated.replay import job_kind, replay_rounds

    with cli_errors():
        if from_attestation is not None:
            attested = load_attestation(from_attestation, ca, data_dir)
            if attested.kind != "pretrain":
                raise InvalidArgumentError(
                    f"job {attested.job_id} is federated: its training used the sites' "
                    "private data, so only its aggregation replays, on the coordinator, "
                    "from the log and the retained updates (`coordinator replay JOB`)"
                )
            console.print(
                f"{from_attestation} verifies: {attested.subject} of job {attested.job_id}"
            )
            replay_pretraining_job(attested.job_id, attested.records)
            return
        if job_id is None:
            raise InvalidArgumentError("name the job to replay, or pass --from-attestation")
        _, report = load_verified(None, key, data_dir, allow_unbound_keys=allow_unbound_keys)
        records = job_records(report, job_id)
        if job_kind(records) == "pretrain":
            replay_pretraining_job(job_id, records)
            return
        results = replay_rounds(data_dir, job_id, records)
        for result in results:
            console.print(
                f"round {result.round}: {result.updates} updates, aggregate "
                f"{result.replayed_digest[:16]} matches the log"
            )
        logged = report.rounds_of(job_id)
        console.print(
            f"replay OK: {len(results)} rounds reproduced bit for bit "
            f"(the log holds {logged} round(s) of job {job_id}, each once)"
        )


def replay_pretraining_job(job_id: str, records: list[Record]) -> None:
    """Re-run a pretraining job's outer steps here, printing each step as it matches."""
    # Imported here: torch and the compute engine take seconds to import. Frozen, the
    # collector does not walk torch's objects again at each full collection and at exit:
    # 1 to 2 CPU-s of a replay (measured with and without, side by side, on the
    # project's 2-core VM: docs/architecture.md, "Start-up").
    with imports_without_gc():
        from coordinator.pretraining.replay import plan_replay, replay_pretraining

    plan = plan_replay(job_id, records)
    for note in plan.notes:
        console.print(f"note: {note}")
    corpus = f"corpus {plan.corpus_digest[:16]} (Python {plan.python_version})"
    console.print(
        f"{corpus} {'matches the log' if plan.final_model_digest else 'built'}; "
        f"replaying {plan.steps} outer step(s) of job {job_id} on this CPU"
    )
    started = time.monotonic()
    with console.status(f"replaying step 0 of {plan.steps}") as status:

        def show(step: StepReplay) -> None:
            fresh = f", {len(step.fresh_workers)} fresh" if step.fresh_workers else ""
            console.print(
                f"step {step.step} (round {step.step + 1}): {len(step.workers)} worker(s)"
                f"{fresh}; pseudo-gradients, aggregate {step.aggregate_digest[:16]} and model "
                f"{step.model_digest[:16]} match the log ({step.seconds:.1f} s)"
            )
            status.update(f"replaying step {step.step + 1} of {plan.steps}")

        steps = replay_pretraining(plan, on_step=show)
    final = "the logged final model" if plan.final_model_digest else "model"
    console.print(
        f"replay OK: {len(steps)} outer step(s) reproduced bit for bit in "
        f"{time.monotonic() - started:.1f} s; {final} {steps[-1].model_digest[:16]}"
    )
