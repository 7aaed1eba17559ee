"""Live progress of a job: rounds (or outer steps), participants, loss, accuracy or
perplexity."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from consortium.proto.v1 import jobs_pb2
from coordinator.cli.remote import Remote

STATE_NAMES = {
    jobs_pb2.JOB_STATE_QUEUED: "queued",
    jobs_pb2.JOB_STATE_RUNNING: "running",
    jobs_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    jobs_pb2.JOB_STATE_FAILED: "failed",
    jobs_pb2.JOB_STATE_CANCELLED: "cancelled",
}
FINAL = frozenset(
    {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED}
)


# The one figure the progress line shows, by the first of these a round reports.
HEADLINE_METRICS = (
    ("eval_accuracy", "accuracy"),
    ("eval_perplexity", "perplexity"),
    ("val_loss", "val loss"),
)


def state_name(state: int) -> str:
    return {int(k): v for k, v in STATE_NAMES.items()}.get(state, "unknown")


def describe_round(record: jobs_pb2.RoundMetrics) -> str:
    parts = [f"round {record.round}", f"{record.participants} participants"]
    for key in ("train_loss", "eval_loss", "eval_accuracy", "eval_perplexity", "val_loss"):
        if key in record.metrics:
            parts.append(f"{key} {record.metrics[key]:.4f}")
    return ", ".join(parts)


def watch_job(remote: Remote, job_id: str, console: Console) -> jobs_pb2.Job:
    """Follow a job until it ends; returns its final snapshot."""
    job = remote.get(job_id).job
    columns = (
        TextColumn("{task.fields[name]}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}", markup=False),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(
            "rounds", total=job.rounds_total, name=f"{job.name} ({job.job_id})", status="queued"
        )
        for event in remote.watch(job_id):
            if event.HasField("round"):
                record = event.round
                if record.round > 0:
                    progress.update(task, completed=record.round)
                status = f"{record.participants} participants"
                for key, label in HEADLINE_METRICS:
                    if key in record.metrics:
                        status += f", {label} {record.metrics[key]:.3f}"
                        break
                progress.update(task, status=status)
                progress.console.print(describe_round(record))
            elif event.HasField("job"):
                if event.job.message != job.message and event.job.state not in FINAL:
                    progress.console.print(f"{state_name(event.job.state)}: {event.job.message}")
                job = event.job
                progress.update(task, status=state_name(job.state))
                if job.state in FINAL:
                    break
    return remote.get(job_id).job
