"""Pipelines: a federated job that starts from another job's output model.

`init_from = "<job id>"` in a federated spec names the source job: a pretraining job
(its byte-level model) or another federated job. At submit the source must exist, not
have failed, and produce the spec's model family. At run time the ServerApp loads the
source's saved model and checks its digest against the source's signed final record in
the provenance log before a single round starts, and logs the digest it started from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from safetensors.numpy import load_file

from consortium.errors import ConflictError, JobSpecError, NotFoundError
from consortium.provenance.log import RECORD, read_lines, record_signing_bytes
from consortium.provenance.records import JobCompleted, RecordType, parse_record, record_type
from consortium.provenance.signing import SignatureError, VerifyingKey, unb64
from consortium.tensor_digest import arrays_digest
from consortium.workloads import OptionValue, load_workload
from coordinator.jobs.spec import FederatedJobSpec, spec_of
from coordinator.pretraining.spec import PretrainJobSpec
from coordinator.state import JobRecord, JobState

if TYPE_CHECKING:
    from torch import nn

ENDED_BADLY = frozenset({JobState.FAILED, JobState.CANCELLED})


class JobLookup(Protocol):
    """What a pipeline reads of other jobs: the state store, or a ServerApp's
    `RunningJob` (which never opens the store itself)."""

    def get_job(self, job_id: str) -> JobRecord: ...


class StartingModelError(ConflictError):
    """The source model is missing, or differs from what the provenance log signed."""


@dataclass(frozen=True)
class ModelFamily:
    model: str  # the workload that builds it (a pretraining job's: bytelm)
    options: dict[str, OptionValue]


@dataclass(frozen=True)
class StartingModel:
    job_id: str
    family: ModelFamily
    digest: str  # arrays_digest of the parameters, as the source's final record signs


def model_family(store: JobLookup, job: JobRecord) -> ModelFamily:
    """The model (name and size) that `job` produces."""
    spec = spec_of(job)
    if isinstance(spec, PretrainJobSpec):
        config = spec.bytelm_config
        return ModelFamily(
            "bytelm",
            {
                "n_layer": config.n_layer,
                "n_head": config.n_head,
                "n_embd": config.n_embd,
                "block_size": config.block_size,
            },
        )
    return family_of(store, spec)


def family_of(store: JobLookup, spec: FederatedJobSpec) -> ModelFamily:
    """The model a federated spec trains: its own, or its source's."""
    if spec.init_from is None:
        return ModelFamily(spec.workload, dict(spec.model_options))
    return model_family(store, store.get_job(spec.init_from))


def check_init_from(store: JobLookup, spec: FederatedJobSpec) -> None:
    """At submit: the source exists, has not failed, and fits the spec."""
    if spec.init_from is None:
        return
    try:
        source = store.get_job(spec.init_from)
    except NotFoundError:
        raise JobSpecError(
            f"invalid job spec: field 'init_from': there is no job {spec.init_from!r}"
        ) from None
    if source.state in ENDED_BADLY:
        raise JobSpecError(
            f"invalid job spec: field 'init_from': job {source.job_id} ended "
            f"{source.state.value.lower()}; it has no model to start from"
        )
    family = model_family(store, source)
    if family.model != spec.workload:
        raise JobSpecError(
            f"invalid job spec: field 'workload': job {source.job_id} produces a "
            f"{family.model!r} model, not {spec.workload!r}"
        )
    block = family.options.get("block_size")
    if isinstance(block, int) and spec.seq_len > block:
        raise JobSpecError(
            f"invalid job spec: field 'seq_len': must be <= the source model's block_size "
            f"({block}), got {spec.seq_len}"
        )


def waiting_reason(store: JobLookup, spec: FederatedJobSpec) -> str | None:
    """None when the job may start; why not otherwise. Raises when it never can."""
    if spec.init_from is None:
        return None
    source = store.get_job(spec.init_from)
    if source.state is JobState.SUCCEEDED:
        return None
    if source.state in ENDED_BADLY:
        raise StartingModelError(
            f"job {source.job_id}, whose model this job starts from, ended "
            f"{source.state.value.lower()}"
        )
    return f"waiting for job {source.job_id} (its model is this job's starting point)"


def signed_final_digest(log_path: Path, key: VerifyingKey, job_id: str) -> str:
    """The model digest in `job_id`'s final log record, after checking its signature."""
    for line in read_lines(log_path):
        entry = json.loads(line)
        # job_completed, or job_finished (its old name for pretraining jobs)
        if entry.get("kind") != RECORD or record_type(str(entry.get("type"))) != (
            RecordType.JOB_COMPLETED
        ):
            continue
        record = parse_record(entry)
        if not isinstance(record, JobCompleted) or record.job_id != job_id:
            continue
        try:
            key.verify(
                unb64(entry["signature"]),
                record_signing_bytes(entry["index"], entry["type"], entry["body"]),
            )
        except SignatureError as err:
            raise StartingModelError(
                f"the final record of job {job_id} (log index {entry['index']}) has a bad "
                f"signature: {err}"
            ) from None
        return record.final_model_digest
    raise StartingModelError(f"the provenance log has no final record of job {job_id}")


def load_starting_model(
    store: JobLookup, spec: FederatedJobSpec, log_path: Path, key: VerifyingKey
) -> tuple[nn.Module, StartingModel]:
    """Build the source's model and load its weights, checked against the signed log."""
    assert spec.init_from is not None
    source = store.get_job(spec.init_from)
    if source.state is not JobState.SUCCEEDED or not source.model_path:
        raise StartingModelError(f"job {source.job_id} has not produced a model")
    family = model_family(store, source)
    path = Path(source.model_path)
    if not path.is_file():
        raise StartingModelError(f"the model of job {source.job_id} is missing: {path}")
    weights = {name: np.asarray(value, np.float32) for name, value in load_file(path).items()}
    digest = arrays_digest(weights)
    expected = signed_final_digest(log_path, key, source.job_id)
    if digest != expected:
        raise StartingModelError(
            f"{path} does not hold the model job {source.job_id} finished with: digest "
            f"{digest[:16]}..., the signed log says {expected[:16]}..."
        )
    # Imported here: only the ServerApp builds the model; the scheduler, which checks a
    # pipeline's source at submit, never pays for importing torch.
    import torch

    workload = load_workload(family.model)
    model = workload.build_model(family.options)
    workload.load_exchanged(model, {k: torch.from_numpy(v) for k, v in weights.items()})
    return model, StartingModel(source.job_id, family, digest)
