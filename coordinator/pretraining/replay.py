"""Replay a pretraining job from its provenance log: re-run training, compare bit for bit.

A pretraining job trains on public data (the Python standard library's own source,
rebuilt on this machine), so anyone holding the log can redo it. `plan_replay` reads the
job's verified records and refuses what cannot be replayed; `replay_pretraining` then
re-runs every logged outer step in this process, following the logged plan exactly:

1. the step seed is drawn again from the spec's seed (PCG64, as the controller draws
   it) and each worker's batch seed is derived from it and the worker's position; both
   must equal the logged ones;
2. each logged worker's H inner AdamW steps run again on its logged shards, from the
   replayed global weights, with `InnerTrainer` (the class the Ray actors are) on one
   CPU thread with deterministic kernels;
3. the pseudo-gradients are averaged with the same exact streaming mean, in the same
   (sorted) order, and the outer Nesterov step is applied.

After each step the pseudo-gradient digests (worker by worker), the aggregate digest and
the new model digest are compared with the log; the first difference raises
`ReplayMismatchError` (exit code 15) naming the step and the worker.

No Ray is needed. In deterministic CPU mode a worker's result depends only on its inputs
and on its AdamW state, and the log says when that state started fresh: a worker's first
step, a step after one it was absent from or lost in, and every step after a
`job_resumed` record (a restarted coordinator starts new worker actors).

Refused up front with `NotReplayableError` (exit code 10), one line saying why:
``deterministic = false``; GPU workers; a corpus digest (Python version) or torch
version other than the job's; a log with a gap in its outer steps; and, with
``inner_optimizer_state = "keep"``, a step that needed several attempts (the failed
attempts advanced some workers' AdamW state in a way the log does not describe).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from consortium.aggregation import StreamingMean
from consortium.errors import ConflictError, JobSpecError, NotFoundError
from consortium.inner_loop import InnerTrainer, corpus_for
from consortium.lm import Weights, model_weights
from consortium.provenance.environment import describe_environment
from consortium.provenance.records import (
    JobCompleted,
    JobResumed,
    JobStarted,
    OuterStep,
    Record,
    WorkerEntry,
)
from consortium.pseudo_gradient_codec import decode
from consortium.tensor_digest import arrays_digest
from coordinator.federated.replay import ReplayMismatchError
from coordinator.pretraining.diloco import apply_outer_step, global_model
from coordinator.pretraining.schedule import derive_seed
from coordinator.pretraining.spec import PretrainJobSpec, validate_pretrain_spec
from coordinator.pretraining.worker_config import worker_config

PRETRAIN = "pretrain"
UPDATE_WEIGHT = 1  # as in the controller: every worker did the same H steps


class NotReplayableError(ConflictError):
    """The job cannot be replayed bit for bit here; the message says why."""


@dataclass(frozen=True)
class StepReplay:
    """One outer step replayed; every digest equals the logged one."""

    step: int
    workers: tuple[str, ...]
    fresh_workers: tuple[str, ...]  # started with a new AdamW state at this step
    aggregate_digest: str
    model_digest: str
    seconds: float


@dataclass(frozen=True)
class PretrainReplayPlan:
    job_id: str
    spec: PretrainJobSpec
    events: tuple[OuterStep | JobResumed, ...]  # in log order
    corpus_digest: str
    python_version: str
    final_model_digest: str | None  # from job_completed, when the job finished
    notes: tuple[str, ...]  # environment differences that do not prevent replay

    @property
    def steps(self) -> int:
        return sum(1 for e in self.events if isinstance(e, OuterStep))


def plan_replay(job_id: str, records: Sequence[Record]) -> PretrainReplayPlan:
    """Check that the job's verified `records` can be replayed here, cheapest check first.

    Builds this machine's corpus to compare its digest with the logged one. Raises
    `NotReplayableError` or `NotFoundError` (no outer step logged).
    """
    started = next((r for r in records if isinstance(r, JobStarted)), None)
    if started is None or started.kind != PRETRAIN:
        raise NotFoundError(f"the log holds no job_started record of pretraining job {job_id}")
    refuse = _refuser(job_id)
    try:
        spec = validate_pretrain_spec(started.spec)
    except JobSpecError as error:
        raise NotReplayableError(
            f"job {job_id} cannot be replayed by this version of the code: its logged spec "
            f"no longer validates ({error})"
        ) from None
    environment: dict[str, Any] = started.environment
    if not spec.deterministic:
        refuse("it ran with deterministic = false")
    events = tuple(r for r in records if isinstance(r, OuterStep | JobResumed))
    steps = [e for e in events if isinstance(e, OuterStep)]
    if not steps:
        raise NotFoundError(f"the log holds no outer step of job {job_id}; nothing to replay")
    gpu_steps = [s.step for s in steps if any(w.device != "cpu" for w in s.workers)]
    if spec.device == "gpu" or gpu_steps:
        refuse(
            "it ran on GPUs"
            + (f" (from step {gpu_steps[0]})" if gpu_steps else "")
            + ", whose kernels are not bit-reproducible across machines; only CPU jobs replay"
        )
    finished = next((r for r in records if isinstance(r, JobCompleted)), None)
    corpus = corpus_for(spec)
    here = platform.python_version()
    logged_python = str(environment.get("python", "?"))
    if finished is not None and finished.corpus_digest != corpus.digest:
        refuse(
            f"it trained on stdlib corpus {str(finished.corpus_digest)[:16]} (Python "
            f"{logged_python}) but this machine builds {corpus.digest[:16]} (Python {here}); "
            f"replay with Python {logged_python}"
        )
    if finished is None and logged_python != here:
        refuse(
            f"it ran on Python {logged_python} and, unfinished, logged no corpus digest, so "
            f"nothing shows that this machine (Python {here}) builds the same stdlib corpus; "
            f"replay with Python {logged_python}"
        )
    ours = describe_environment("cpu", deterministic=True)
    logged_torch = environment.get("versions", {}).get("torch")
    if logged_torch != ours["versions"]["torch"]:
        refuse(
            f"it ran with torch {logged_torch}, this machine has torch "
            f"{ours['versions']['torch']}; kernels differ between versions"
        )
    _check_sequence(job_id, spec, steps)
    notes = []
    if environment.get("code", {}).get("source_digest") != ours["code"]["source_digest"]:
        notes.append("the installed source differs from the job's (source digest)")
    if environment.get("platform") != ours["platform"]:
        notes.append(f"the platform differs from the job's ({environment.get('platform')})")
    if finished is None:
        notes.append("the job has not finished; replaying the steps logged so far")
    return PretrainReplayPlan(
        job_id=job_id,
        spec=spec,
        events=events,
        corpus_digest=corpus.digest,
        python_version=here,
        final_model_digest=finished.final_model_digest if finished is not None else None,
        notes=tuple(notes),
    )


def replay_pretraining(
    plan: PretrainReplayPlan, on_step: Callable[[StepReplay], None] | None = None
) -> list[StepReplay]:
    """Re-run every logged outer step; raises `ReplayMismatchError` at the first difference.

    Like a worker, this switches the process's torch to one thread and deterministic
    algorithms (`enable_determinism`), for the rest of the process.
    """
    replayer = _Replayer(plan)
    replayed: list[StepReplay] = []
    for event in plan.events:
        if isinstance(event, JobResumed):
            replayer.restart_workers()
            continue
        result = replayer.step(event)
        replayed.append(result)
        if on_step is not None:
            on_step(result)
    final = replayed[-1].model_digest
    if plan.final_model_digest is not None and final != plan.final_model_digest:
        raise ReplayMismatchError(
            f"final model digest {final[:16]} differs from the logged "
            f"{plan.final_model_digest[:16]} in job_completed"
        )
    return replayed


class _Replayer:
    """The controller's state (global model, outer optimizer, step-seed generator) and
    the workers' (one `InnerTrainer` per worker that carries AdamW state)."""

    def __init__(self, plan: PretrainReplayPlan) -> None:
        spec = self.spec = plan.spec
        self.config = worker_config(spec, plan.corpus_digest, "cpu")
        self.keep = spec.inner_optimizer_state == "keep"
        self.model, self.outer = global_model(spec)  # as `DiLoCoController` builds them
        self.seeds = np.random.Generator(np.random.PCG64(spec.seed))
        self.trainers: dict[str, InnerTrainer] = {}  # last step's workers, with their state
        self.shared: InnerTrainer | None = None  # "reset": any trainer will do

    def restart_workers(self) -> None:
        self.trainers = {}

    def step(self, event: OuterStep) -> StepReplay:
        started = time.monotonic()
        step = event.step
        where = _where(step)
        step_seed = int(self.seeds.integers(0, 2**63 - 1))
        if step_seed != event.step_seed:
            raise ReplayMismatchError(
                f"{where}: step seed {step_seed} drawn from the spec's seed {self.spec.seed} "
                f"differs from the logged {event.step_seed}"
            )
        # Sorted by worker id, the order the controller averages (and logs) them in.
        workers = sorted(event.workers, key=lambda w: w.worker)
        for worker in workers:  # all seeds first: a wrong one is named before any training
            seed = derive_seed(step_seed, worker.position)
            if seed != worker.seed:
                raise ReplayMismatchError(
                    f"{where}, worker {worker.worker} ({worker.institution}): batch seed "
                    f"{seed} derived from the step seed differs from the logged {worker.seed}"
                )
        global_weights = model_weights(self.model)
        mean = StreamingMean(global_weights)
        current: dict[str, InnerTrainer] = {}
        fresh: list[str] = []
        for worker in workers:
            name = worker.worker
            trainer = self._trainer(name)
            if trainer is not self.trainers.get(name):
                fresh.append(name)
            current[name] = trainer
            mean.add(self._inner(trainer, step, worker, global_weights), UPDATE_WEIGHT)
        if mean.digest() != event.aggregate_digest:
            raise ReplayMismatchError(
                f"{where}: aggregate digest {mean.digest()[:16]} differs from the logged "
                f"{event.aggregate_digest[:16]}"
            )
        model_digest = self._outer_step(mean.result())
        if model_digest != event.model_digest:
            raise ReplayMismatchError(
                f"{where}: model digest {model_digest[:16]} after the outer step differs from "
                f"the logged {event.model_digest[:16]}"
            )
        self.trainers = current if self.keep else {}
        return StepReplay(
            step=step,
            workers=tuple(current),
            fresh_workers=tuple(fresh),
            aggregate_digest=mean.digest(),
            model_digest=model_digest,
            seconds=time.monotonic() - started,
        )

    def _trainer(self, worker: str) -> InnerTrainer:
        if self.keep:  # the same actor (and AdamW state) only if it ran the previous step
            return self.trainers.get(worker) or InnerTrainer(self.config)
        self.shared = self.shared or InnerTrainer(self.config)
        return self.shared

    def _inner(
        self, trainer: InnerTrainer, step: int, worker: WorkerEntry, global_weights: Weights
    ) -> Weights:
        """The worker's H inner steps; its pseudo-gradient as sent (in the job's codec),
        checked against the log, then decoded as the controller decodes it."""
        sent, _ = trainer.run_inner(
            global_weights,
            tuple(worker.shard_ids),
            self.spec.inner_steps,
            worker.seed,
            step * self.spec.inner_steps,  # positions the inner learning-rate schedule
        )
        digest = arrays_digest(sent)
        if digest != worker.pseudo_gradient_digest:
            raise ReplayMismatchError(
                f"{_where(step)}, worker {worker.worker} ({worker.institution}): "
                f"pseudo-gradient digest {digest[:16]} differs from the logged "
                f"{worker.pseudo_gradient_digest[:16]}"
            )
        return decode(sent, self.spec.pseudo_gradient_codec)

    def _outer_step(self, average: Weights) -> str:
        """The outer step, as the controller takes it; the new model digest."""
        apply_outer_step(self.model, self.outer, average)
        return arrays_digest(model_weights(self.model))


def _where(step: int) -> str:
    return f"step {step} (round {step + 1})"


def _refuser(job_id: str) -> Callable[[str], None]:
    def refuse(reason: str) -> None:
        raise NotReplayableError(f"job {job_id} cannot be replayed bit for bit: {reason}")

    return refuse


def _check_sequence(job_id: str, spec: PretrainJobSpec, steps: list[OuterStep]) -> None:
    """Outer steps 0, 1, ... each logged once, with H inner steps per worker."""
    for expected, record in enumerate(steps):
        if record.step != expected:
            raise NotReplayableError(
                f"job {job_id} cannot be replayed: the log has step {record.step} where "
                f"step {expected} was expected (a step checkpointed but never logged?)"
            )
        if spec.inner_optimizer_state == "keep" and record.attempts > 1:
            raise NotReplayableError(
                f"job {job_id} cannot be replayed bit for bit: step {expected} took "
                f'{record.attempts} attempts, and with inner_optimizer_state = "keep" the '
                "failed attempts advanced some workers' AdamW state in a way the log does not "
                "record"
            )
        for worker in record.workers:
            if worker.inner_steps != spec.inner_steps:
                raise NotReplayableError(
                    f"job {job_id} cannot be replayed: step {expected} worker "
                    f"{worker.worker} logged {worker.inner_steps} inner steps, the spec "
                    f"says {spec.inner_steps}"
                )
