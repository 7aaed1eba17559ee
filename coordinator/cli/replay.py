"""`coordinator replay`: reproduce a job bit for bit, from the log or from an attestation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from consortium.cli_errors import cli_errors
from consortium.errors import InvalidArgumentError, NotFoundError, ProvenanceInvalidError
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
    model: Annotated[
        Path | None,
        typer.Option(
            help="The attested model file (with --from-attestation): check that it is the "
            "attestation's subject and holds the weights the replay ends with."
        ),
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
        if model is not None and from_attestation is None:
            raise InvalidArgumentError("--model goes with --from-attestation")
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
            if model is not None:  # before the training: a wrong file fails at once
                check_model_is_subject(model, attested.sha256)
            final_digest = replay_pretraining_job(attested.job_id, attested.records)
            if model is not None:
                check_model_holds(model, final_digest)
                console.print(f"{model} holds the replayed final model {final_digest[:16]}")
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


def check_model_is_subject(model: Path, subject_sha256: str) -> None:
    """The model file the reviewer holds is the attestation's subject (its sha256)."""
    from consortium.tensor_digest import file_digest

    if not model.is_file():
        raise NotFoundError(f"model file {model} does not exist")
    found = file_digest(str(model))
    if found != subject_sha256:
        raise ProvenanceInvalidError(
            f"{model} (sha256 {found[:16]}) is not the attestation's subject "
            f"(sha256 {subject_sha256[:16]})"
        )


def check_model_holds(model: Path, replayed_digest: str) -> None:
    """The file's weights are the model the replay ended with. The subject's sha256 and
    the logged final model digest are tied only by the coordinator's signature, so a
    replay that matched the log says nothing of the file until its weights are compared
    (a signer could attest another file beside an honest training history)."""
    # Imported here: numpy and safetensors, as the replay itself imports them. The file
    # is read as safetensors (a JSON header and raw bytes), never unpickled.
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from consortium.tensor_digest import arrays_digest
    from coordinator.federated.replay import ReplayMismatchError

    try:
        digest = arrays_digest(load_file(str(model)))
    except (SafetensorError, ValueError, OSError) as error:
        raise ReplayMismatchError(f"{model} is not a readable safetensors model: {error}") from None
    if digest != replayed_digest:
        raise ReplayMismatchError(
            f"{model} is the attested file, but its weights (digest {digest[:16]}) are not "
            f"the model the replay ended with ({replayed_digest[:16]}): the attestation "
            "names another file than the training it records produced"
        )


def replay_pretraining_job(job_id: str, records: list[Record]) -> str:
    """Re-run a pretraining job's outer steps here, printing each step as it matches;
    the digest of the model the replay ends with."""
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
    return steps[-1].model_digest
