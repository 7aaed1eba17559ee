"""The DiLoCo outer loop as an explicit, steppable state machine.

DiLoCo (Douillard et al., 2023): every worker starts from the global weights, takes H
local AdamW steps on its own shards, and sends back its *pseudo-gradient* ``global -
local``. The controller averages them and applies one outer SGD step with Nesterov
momentum, treating the average as a gradient. Workers talk to the controller once per H
inner steps, so communication is H times lower than synchronous data parallelism.

States (`ControllerState`)::

    RUNNING --step()--> RUNNING ... --last outer step--> FINISHED
       |  ^                                              (step() then raises)
       v  |  enough workers again
    WAITING   too few usable workers, or too few results in an attempt; `waiting_reason`
       |      says which and what would help (also passed to ``on_wait`` as soon as the
       |      controller starts waiting); the step index does not move
       v  max_failed_steps attempts in a row without enough results
    FAILED

One `step()` = one attempt at one outer step: plan workers (`ScalingPolicy`, honouring
``per_institution_caps``, ``max_workers`` and ``min_workers``, waiting up to
``wait_for_workers_s``), make the workers ready (new nodes or sites join here), assign
shards, run every worker's inner loop with ``step_timeout_s``, drop workers that die,
time out or send a rejected update, average the rest with the exact streaming mean,
take the outer step, evaluate, checkpoint. Where the inner loops run is the
`InnerLoops` given (coordinator/pretraining/inner_loops.py): the Ray pool's actors by
default, or the institutions' own sites over Flower (federated pretraining).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from consortium.aggregation import StreamingMean, UpdateRejected
from consortium.data.stdlib_corpus import StdlibCorpus
from consortium.inner_loop import InnerMetrics, corpus_for
from consortium.lm import Weights, load_weights, model_weights, validation_loss
from consortium.models.bytelm import ByteLM
from consortium.optim import SGD
from consortium.pseudo_gradient_codec import (
    Encoded,
    PseudoGradientEncodingError,
    decode,
    encoded_nbytes,
)
from consortium.tensor_digest import arrays_digest
from coordinator.pretraining.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from coordinator.pretraining.cluster import (
    ClusterUnreachableError,
    ClusterView,
    ScalingDecision,
    ScalingPolicy,
    WorkerSlot,
)
from coordinator.pretraining.errors import (
    CheckpointMismatchError,
    ClusterNotConnectedError,
    ControllerFinishedError,
    PretrainFailedError,
)
from coordinator.pretraining.inner_loops import (
    Assignment,
    InnerLoops,
    InnerStep,
    Lost,
    Returned,
    StopRequested,
)
from coordinator.pretraining.records import ControllerState, OuterStepRecord, WorkerStepResult
from coordinator.pretraining.schedule import assign_shards, derive_seed
from coordinator.pretraining.spec import IDENTITY_DEFAULTS, PretrainJobSpec
from coordinator.pretraining.spot_check import SpotChecker
from coordinator.pretraining.worker_config import worker_config

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5  # how often a waiting controller re-reads the cluster
UPDATE_WEIGHT = 1  # every worker did the same H steps, so pseudo-gradients weigh alike


def global_model(spec: PretrainJobSpec) -> tuple[ByteLM, SGD]:
    """The initial global model and its outer optimizer (Nesterov momentum SGD), built
    from the spec alone, so a replay starts from the same bits."""
    model = ByteLM(spec.bytelm_config, seed=spec.seed)
    outer = SGD(
        model.parameters(),
        lr=spec.outer_lr,
        momentum=spec.outer_momentum,
        nesterov=spec.outer_momentum > 0,
    )
    return model, outer


def apply_outer_step(model: torch.nn.Module, outer: SGD, average: Weights) -> None:
    """The outer step: the averaged pseudo-gradient as the gradient of `outer` (Nesterov
    SGD from `global_model`); the controller, replay and benchmarks all take it here."""
    for name, param in model.named_parameters():
        param.grad = torch.from_numpy(average[name])
    outer.step()
    outer.zero_grad()


DispatchHook = Callable[[int, list[str]], None]  # (outer step, worker ids) after dispatch
# Why the controller waits for workers, as soon as it starts to; None once it goes ahead.
WaitHook = Callable[[str | None], None]


class DiLoCoController:
    def __init__(
        self,
        spec: PretrainJobSpec,
        cluster_view: ClusterView,
        checkpoint_dir: Path,
        *,
        scaling_policy: ScalingPolicy | None = None,
        on_dispatch: DispatchHook | None = None,
        stop: threading.Event | None = None,
        on_wait: WaitHook | None = None,
        worker_class: Callable[[WorkerSlot], Any] | None = None,
        inner_loops: InnerLoops | None = None,
        fence: Callable[[], None] | None = None,
    ) -> None:
        """``inner_loops``: where the workers' inner loops run (default: actors of the
        Ray cluster this process is connected to). ``worker_class``: the Ray actor class a
        slot runs there (default `DiLoCoWorker`); tests give one institution a dishonest
        worker with it. ``fence`` runs before each step is committed (checkpointed): a
        ServerApp's `RunningJob.ensure_current`, so a run that no longer owns its job
        raises there and leaves the owner's checkpoint alone."""
        self.spec = spec
        self.cluster_view = cluster_view
        self.checkpoint_dir = Path(checkpoint_dir)
        self.scaling_policy = scaling_policy or ScalingPolicy(
            spec.min_workers,
            min(spec.max_workers or spec.num_shards, spec.num_shards),
            spec.per_institution_caps,
        )
        self.on_dispatch = on_dispatch
        self.on_wait = on_wait
        self._fence = fence or (lambda: None)
        self._reported_wait: str | None = None  # what on_wait was last told
        self.stop = stop or threading.Event()
        self.corpus: StdlibCorpus = corpus_for(spec)
        self.model, self.outer_optimizer = global_model(spec)
        self.step_index = 0  # outer steps completed
        self.records: list[OuterStepRecord] = []
        self.waiting_reason: str | None = None
        self._rng_state: dict[str, Any] = dict(np.random.PCG64(spec.seed).state)
        self._failed_attempts = 0
        self._quarantined: set[str] = set()  # nodes that lost a worker in the last attempt
        # Institutions a worker of which failed a spot check -> that worker: barred for the
        # rest of the job, whatever node or site they offer next (a new Ray node or
        # Flower node id is cheap; the institution is what the coordinator verified).
        self._barred: dict[str, str] = {}
        self._failures_to_log: dict[str, str] = {}  # worker -> node id, since last commit
        checkpoint = load_checkpoint(self.checkpoint_dir)
        if checkpoint is not None:
            self._restore(checkpoint)
        self.state = (
            ControllerState.FINISHED
            if self.step_index >= spec.outer_steps
            else ControllerState.RUNNING
        )
        self._loops = inner_loops or self._ray_inner_loops(worker_class)
        self.spot_checker = SpotChecker(spec, self.corpus.digest)

    def _ray_inner_loops(self, worker_class: Callable[[WorkerSlot], Any] | None) -> InnerLoops:
        import ray  # only where the workers are Ray actors

        from coordinator.pretraining.pool import RayInnerLoops, WorkerPool

        if not ray.is_initialized():
            raise ClusterNotConnectedError(
                "pretraining needs a Ray connection: call ray.init(address=...) first"
            )
        pool = WorkerPool(
            lambda slot: worker_config(self.spec, self.corpus.digest, slot.device),
            self.spec.worker_start_timeout_s,
            self.stop,
            actor_class=worker_class,
        )
        return RayInnerLoops(pool, self.stop)

    # -- public surface ---------------------------------------------------------------

    def global_weights(self) -> Weights:
        return model_weights(self.model)

    def model_digest(self) -> str:
        return arrays_digest(self.global_weights())

    def evaluate(self) -> float:
        """Validation loss (nats per byte) of the current global model."""
        spec = self.spec
        return validation_loss(
            self.model, self.corpus.validation, spec.seq_len, spec.batch_size, spec.eval_batches
        )

    def step(self) -> OuterStepRecord | None:
        """One attempt at the next outer step; None when it could not be taken."""
        if self.state in (ControllerState.FINISHED, ControllerState.FAILED):
            raise ControllerFinishedError(f"controller is {self.state}; no step to take")
        quarantined, self._quarantined = self._quarantined, set()  # lasts one attempt
        decision = self._plan(quarantined)
        if decision.waiting_reason is not None:
            self._wait(decision.waiting_reason)
            return None
        started = time.monotonic()
        lost = self._loops.reconcile(decision.workers)
        workers = [slot for slot in decision.workers if slot.worker_id not in lost]
        accepted: Returned = {}  # stays empty if too few start
        if len(workers) >= self.spec.min_workers:
            step_seed, rng_after = self._peek_step_seed()
            plan = self._assign(workers, step_seed)
            returned, died = self._run_inner(plan)
            lost.update(died)
            decoded = self._decode(returned, lost)
            verified = self._spot_check(plan, returned, decoded, lost)
            mean = StreamingMean(self.global_weights())
            for worker_id in sorted(decoded):  # any order gives the same mean; sorted logs
                try:
                    mean.add(decoded[worker_id], UPDATE_WEIGHT)
                    accepted[worker_id] = returned[worker_id]
                except UpdateRejected as err:
                    self._reject(worker_id, err, lost)
        self._quarantined = {s.node_id for s in decision.workers if s.worker_id in lost}
        if len(accepted) < self.spec.min_workers:
            self._attempt_failed(len(accepted), lost)
            return None
        received = sum(a.nbytes for a in self.global_weights().values())
        results = tuple(
            _result(plan[w], sent, metrics, received)
            for w, (sent, metrics) in sorted(accepted.items())
        )
        apply_outer_step(self.model, self.outer_optimizer, mean.result())
        self._rng_state = rng_after
        averaged = tuple(w for w in verified if w in accepted)
        return self._commit(results, lost, step_seed, mean.digest(), started, averaged)

    def run(self, on_step: Callable[[OuterStepRecord], None] | None = None) -> None:
        """Step until FINISHED (or until `stop` is set); raises `PretrainFailedError`."""
        while self.state is not ControllerState.FINISHED and not self.stop.is_set():
            try:
                record = self.step()
            except StopRequested:
                # Mid-attempt: nothing of it was committed; the next run starts the
                # step again from the last checkpoint.
                log.info("outer step %d: stopped while waiting on workers", self.step_index)
                return
            if self.state is ControllerState.FAILED:
                raise PretrainFailedError(self.waiting_reason or "pretraining failed")
            if record is not None and on_step is not None:
                on_step(record)

    def close(self) -> None:
        """Kill this job's worker actors (the checkpoint stays)."""
        self._loops.close()

    def __enter__(self) -> DiLoCoController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one attempt ------------------------------------------------------------------

    def _plan(self, quarantined: set[str]) -> ScalingDecision:
        """Decide, re-reading the cluster for up to ``wait_for_workers_s`` while too few
        workers are usable; the reason to wait goes to `on_wait` at once."""
        deadline = time.monotonic() + self.spec.wait_for_workers_s
        while True:
            try:
                slots = [s for s in self.cluster_view.slots() if s.institution not in self._barred]
                unreachable = ""
            except ClusterUnreachableError as error:  # waits as for too few workers
                slots, unreachable = [], f"{error}; "
            decision = self.scaling_policy.decide(slots, quarantined)
            if decision.go:
                self._report_wait(None)
                return decision
            decision = ScalingDecision(
                (), unreachable + self._explain_wait(decision.waiting_reason, slots)
            )
            self._report_wait(decision.waiting_reason)
            if time.monotonic() >= deadline:
                return decision
            if self.stop.wait(min(POLL_INTERVAL_S, max(deadline - time.monotonic(), 0.0))):
                return decision

    def _explain_wait(self, policy_reason: str | None, slots: list[WorkerSlot]) -> str:
        """What the job needs and what the cluster offers, then the policy's detail."""
        need = self.spec.min_workers
        kind = {"gpu": "GPU ", "cpu": "CPU "}.get(self.spec.device, "")
        workers = f"{need} {kind}worker{'' if need == 1 else 's'}"
        summary = f"needs {workers}, the cluster offers {len(slots)}"
        if self.spec.device == "gpu" and len(slots) < need:
            summary += ' (GPU nodes join with `client join --gpu N`; or set device = "auto")'
        detail = (policy_reason or "").removeprefix("waiting for workers: ")
        return f"{summary}; {detail}"

    def _report_wait(self, reason: str | None) -> None:
        if reason != self._reported_wait:
            self._reported_wait = reason
            if self.on_wait is not None:
                self.on_wait(reason)

    def _wait(self, reason: str) -> None:
        self.state = ControllerState.WAITING
        self.waiting_reason = reason
        self._report_wait(reason)
        log.info("outer step %d: %s", self.step_index, reason)

    def _assign(self, workers: list[WorkerSlot], step_seed: int) -> dict[str, Assignment]:
        shards = assign_shards(self.spec.num_shards, len(workers), self.step_index)
        return {
            slot.worker_id: Assignment(slot, i, shards[i], derive_seed(step_seed, i))
            for i, slot in enumerate(workers)
        }

    def _attempt_failed(self, got: int, lost: dict[str, str]) -> None:
        self._failed_attempts += 1
        reason = (
            f"outer step {self.step_index} attempt {self._failed_attempts} got {got} result(s), "
            f"below min_workers={self.spec.min_workers}; lost {lost}"
        )
        self._wait(reason)
        if self._failed_attempts >= self.spec.max_failed_steps:
            self.state = ControllerState.FAILED
            self.waiting_reason = f"{reason}; giving up after max_failed_steps attempts"

    def _run_inner(self, plan: dict[str, Assignment]) -> tuple[Returned, Lost]:
        steps = self.spec.inner_steps
        request = InnerStep(
            step=self.step_index,
            weights=self.global_weights(),
            inner_steps=steps,
            first_inner_step=self.step_index * steps,
            timeout_s=self.spec.step_timeout_s,
        )
        returned, lost = self._loops.run(request, plan, lambda: self._dispatched(plan))
        for worker_id in lost:
            self._loops.drop(worker_id)
        return returned, lost

    def _dispatched(self, plan: dict[str, Assignment]) -> None:
        if self.on_dispatch is not None:
            self.on_dispatch(self.step_index, sorted(plan))

    def _decode(self, returned: Returned, lost: Lost) -> dict[str, Weights]:
        """Each result's pseudo-gradient, decoded from the job's codec; a result in any
        other layout is rejected like an update the average refuses."""
        decoded: dict[str, Weights] = {}
        for worker_id, (sent, _) in returned.items():
            try:
                decoded[worker_id] = decode(sent, self.spec.pseudo_gradient_codec)
            except PseudoGradientEncodingError as err:
                self._reject(worker_id, err, lost)
        return decoded

    def _reject(self, worker_id: str, error: Exception, lost: dict[str, str]) -> None:
        lost[worker_id] = f"update rejected: {error}"
        self._loops.drop(worker_id)

    def _spot_check(
        self,
        plan: dict[str, Assignment],
        returned: Returned,
        decoded: dict[str, Weights],
        lost: dict[str, str],
    ) -> list[str]:
        """Re-execute a sample of the `decoded` results (`SpotChecker`); one that differs
        leaves `decoded` for `lost`, its worker is dropped and its institution barred. Returns
        the workers checked and found equal."""
        sample = self.spot_checker.sample(decoded)
        if not sample:
            return []
        weights = self.global_weights()
        steps = self.spec.inner_steps
        matched = []
        for worker_id in sample:
            assignment = plan[worker_id]
            failure = self.spot_checker.check(
                weights,
                assignment.shard_ids,
                steps,
                assignment.seed,
                self.step_index * steps,
                returned[worker_id][0],
            )
            if failure is None:
                matched.append(worker_id)
                continue
            node_id = assignment.slot.node_id
            log.warning("outer step %d, worker %s: %s", self.step_index, worker_id, failure)
            del decoded[worker_id]
            lost[worker_id] = failure
            self._loops.drop(worker_id)
            self._barred[assignment.slot.institution] = worker_id
            self._failures_to_log[worker_id] = node_id
        return matched

    def _commit(
        self,
        results: tuple[WorkerStepResult, ...],
        lost: dict[str, str],
        step_seed: int,
        aggregate_digest: str,
        started: float,
        verified: tuple[str, ...],
    ) -> OuterStepRecord:
        spec = self.spec
        self._fence()  # raises, before anything of the step is kept, for a stale run
        val_loss = self.evaluate()
        # Failures of attempts that did not complete a step are logged with this one.
        failures, self._failures_to_log = self._failures_to_log, {}
        record = OuterStepRecord(
            step=self.step_index,
            results=results,
            workers_lost=dict(sorted(lost.items())),
            step_seed=step_seed,
            aggregate_digest=aggregate_digest,
            model_digest=self.model_digest(),
            val_loss=val_loss,
            wall_s=time.monotonic() - started,
            attempts=self._failed_attempts + 1,
            verified=verified,
            verification_failed=dict(sorted(failures.items())),
        )
        self.step_index += 1
        self.records.append(record)
        self._failed_attempts = 0
        self.waiting_reason = None
        self.state = (
            ControllerState.FINISHED
            if self.step_index >= spec.outer_steps
            else ControllerState.RUNNING
        )
        self._save()
        log.info(
            "outer step %d: %d workers, %d lost, val loss %.4f",
            record.step,
            len(results),
            len(lost),
            val_loss,
        )
        return record

    # -- seeds and checkpoints ----------------------------------------------------------

    def _peek_step_seed(self) -> tuple[int, dict[str, Any]]:
        """The next step seed and the RNG state after drawing it (committed on success)."""
        generator = np.random.PCG64()
        generator.state = cast(Any, self._rng_state)
        seed = int(np.random.Generator(generator).integers(0, 2**63 - 1))
        return seed, dict(generator.state)

    def _save(self) -> None:
        save_checkpoint(
            self.checkpoint_dir,
            Checkpoint(
                step=self.step_index,
                model={n: p.detach() for n, p in self.model.named_parameters()},
                outer_optimizer=self.outer_optimizer.state_dict(),
                rng_state=self._rng_state,
                training_identity=self.spec.training_identity(),
                model_digest=self.model_digest(),
                corpus_digest=self.corpus.digest,
                records=tuple(self.records),
            ),
        )

    def _restore(self, checkpoint: Checkpoint) -> None:
        identity = self.spec.training_identity()
        saved = {**IDENTITY_DEFAULTS, **checkpoint.training_identity}
        differing = sorted(
            k for k in identity.keys() | saved.keys() if identity.get(k) != saved.get(k)
        )
        if differing:
            raise CheckpointMismatchError(
                f"{self.checkpoint_dir} holds a checkpoint of another run (fields differ: "
                f"{', '.join(differing)}); use a fresh checkpoint_dir or the original spec"
            )
        if checkpoint.corpus_digest != self.corpus.digest:
            raise CheckpointMismatchError(
                f"the checkpoint was trained on corpus {checkpoint.corpus_digest[:16]} but "
                f"this machine builds {self.corpus.digest[:16]} (another Python version?)"
            )
        load_weights(self.model, {n: t.numpy() for n, t in checkpoint.model.items()})
        self.outer_optimizer.load_state_dict(checkpoint.outer_optimizer)
        self._rng_state = checkpoint.rng_state
        self.step_index = checkpoint.step
        self.records = list(checkpoint.records)
        for record in self.records:  # an institution caught before the restart stays barred
            for worker_id in record.verification_failed:  # ids begin "<institution>/"
                self._barred[worker_id.split("/", 1)[0]] = worker_id
        if self.model_digest() != checkpoint.model_digest:
            raise CheckpointMismatchError(f"{self.checkpoint_dir}: weights do not match digest")


def _result(
    assignment: Assignment, sent: Encoded, metrics: InnerMetrics, bytes_received: int
) -> WorkerStepResult:
    """What the log and accounting say of one worker's step: `sent` is its
    pseudo-gradient as it travelled (in the job's codec), which its digest covers."""
    slot = assignment.slot
    return WorkerStepResult(
        worker=slot.worker_id,
        institution=slot.institution,
        node_id=slot.node_id,
        device=metrics.device,  # where it ran, as the worker says
        position=assignment.position,
        shard_ids=assignment.shard_ids,
        seed=assignment.seed,
        pseudo_gradient_digest=arrays_digest(sent),
        bytes_received=bytes_received,
        bytes_sent=encoded_nbytes(sent),
        compute_s=metrics.compute_s,
        inner_steps=metrics.steps,
        tokens=metrics.tokens,
        train_loss=metrics.mean_loss,
    )
