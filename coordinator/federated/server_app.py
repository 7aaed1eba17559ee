"""The ServerApp that runs one federated job on the SuperLink.

`coordinator serve` submits it through the Control API (`StartRun`, run config: job-id); it reaches
the coordinator's state only through `RunningJob` (its typed spec, admission's
reads, rounds and the job's end, via the job lifecycle), samples nodes with the Flower
strategy named in the spec, admits and aggregates signed updates with
`ConsortiumStrategy`, evaluates the global model on the held-out split after
every round, and records each round three ways: as a checkpoint (for resuming), as a
signed record followed by a signed tree head in the provenance log, and in the job's
state (for `jobs watch`). Every training message asks its site to cosign the log's latest
head (docs/provenance.md, "Witnesses"); the cosignatures are logged with the round, and
when the job ends its sites are asked once more, for the head over its final record.

The log append is the round's commit, exactly once: it is refused when a newer Flower
run owns the job (the coordinator resumed it elsewhere) or when the round is not past
the job's last logged one (`JobRecorder.round`); the refusal is logged and counted
(`consortium_round_commits_refused_total`), nothing of it is recorded, and the run
stops without ending the job. A resumed run starts after the last logged round, from
that round's checkpoint, and first copies into the state any logged round the state
missed (a crash between the two writes).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy
from flwr.supercore.inflatable.inflatable_utils import ObjectPushError

from consortium.errors import CommitRefusedError, ConflictError, ConsortiumError
from consortium.provenance.environment import describe_environment
from consortium.provenance.records import JobStarted, Round
from consortium.provenance.signing import SigningKey
from consortium.tensor_digest import arrays_digest
from consortium.workloads import HeldOut, RoundBudget, load_workload, workload_source
from coordinator.data_dir import DATA_DIR_ENV, DataDir
from coordinator.federated.checkpoints import CheckpointStore, save_model
from coordinator.federated.prompt_grid import PromptGrid
from coordinator.federated.strategy import (
    AggregationRule,
    ConsortiumStrategy,
    TooFewUpdatesError,
    WitnessLog,
    finite_metrics,
)
from coordinator.federated.witness_query import FINAL_WITNESS_TIMEOUT_S, witness_latest_head
from coordinator.jobs.lifecycle import wall_clock_ms
from coordinator.jobs.pipeline import StartingModel, family_of, load_starting_model
from coordinator.jobs.running import JobCancelledError, RoundRecord, RunningJob
from coordinator.jobs.spec import FederatedJobSpec
from coordinator.pretraining.errors import PretrainFailedError
from coordinator.pretraining.spec import PretrainJobSpec
from coordinator.provenance.recorder import JobRecorder

if TYPE_CHECKING:
    from coordinator.federated.pretrain_run import FederatedPretrainRun

log = logging.getLogger(__name__)

app = ServerApp()


def make_sampler(spec: FederatedJobSpec) -> Strategy:
    """Flower's strategy decides which nodes train and what they are sent."""
    if spec.strategy == "fedprox":
        return FedProx(
            fraction_train=1.0,
            fraction_evaluate=0.0,  # the coordinator evaluates centrally
            min_train_nodes=spec.min_clients,
            min_available_nodes=spec.min_clients,
            proximal_mu=spec.proximal_mu,
        )
    return FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=spec.min_clients,
        min_available_nodes=spec.min_clients,
    )


def rule_of(spec: FederatedJobSpec) -> AggregationRule:
    return AggregationRule(
        name=spec.aggregation,
        trim_fraction=spec.trim_fraction,
        krum_byzantine=spec.krum_byzantine,
        max_update_norm=spec.max_update_norm,
    )


def round_budget(spec: FederatedJobSpec) -> RoundBudget:
    return RoundBudget(
        epochs=spec.local_epochs,
        steps=spec.local_steps,
        batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        seed=spec.seed,
        proximal_mu=spec.proximal_mu,
        seq_len=spec.seq_len,
    )


class JobRun:
    """Everything one ServerApp run needs, wired to the coordinator's state."""

    def __init__(self, data_dir: Path, job: RunningJob, spec: FederatedJobSpec) -> None:
        self.data_dir = data_dir
        self.job = job
        self.job_id = job.job_id
        self.spec = spec
        self.checkpoints = CheckpointStore(data_dir, job.job_id)
        # Every append checks, under the log's lock, that the job is still this run's.
        self.provenance = JobRecorder(DataDir(data_dir), job.job_id, fence=job.ensure_current)
        self.current_round = 0  # the round being committed (named in a refusal)
        self.family = family_of(job, self.spec)
        self.workload = load_workload(self.family.model)
        self.held_out: HeldOut | None = self.workload.held_out(
            self.spec.dataset, round_budget(self.spec), self.spec.eval_batches
        )
        self.starting: StartingModel | None = None  # set when init_from is used

    def initial_model(self) -> tuple[torch.nn.Module, int]:
        committed = self.provenance.last_round()
        if committed > 0:
            checkpoint = self.checkpoints.at(committed)
            if checkpoint is None:
                raise ConsortiumError(
                    f"round {committed} of job {self.job_id} is committed in the provenance "
                    "log but its checkpoint is missing; the job cannot resume"
                )
            model = self.workload.build_model(self.family.options)
            self.workload.load_exchanged(model, checkpoint.state_dict)
            self.copy_logged_rounds_to_state(committed)
            log.info("job %s resumes after round %d", self.job_id, committed)
            return model, committed
        if self.spec.init_from is not None:
            model, self.starting = load_starting_model(
                self.job,
                self.spec,
                DataDir(self.data_dir).provenance_log,
                SigningKey.load(DataDir(self.data_dir).signing_key).public,
            )
            log.info(
                "job %s starts from job %s's model %s",
                self.job_id,
                self.starting.job_id,
                self.starting.digest[:16],
            )
            return model, 0
        torch.manual_seed(self.spec.seed)
        return self.workload.build_model(self.family.options), 0

    def numpy_state(self, model: torch.nn.Module) -> dict[str, Any]:
        """The exchanged tensors as numpy, by name: what digests cover."""
        return {k: v.cpu().numpy() for k, v in self.workload.exchanged(model).items()}

    def copy_logged_rounds_to_state(self, committed: int) -> None:
        """Rounds committed in the log that the state missed (the process ended between
        the two writes) are recorded in the state from their log records."""
        recorded = self.job.get_job(self.job_id).rounds_completed
        for body in self.provenance.logged_rounds():
            round_ = int(body["round"])
            if recorded < round_ <= committed:
                self.job.record_round(
                    RoundRecord(
                        job_id=self.job_id,
                        round=round_,
                        participants=len(body.get("participants", [])),
                        metrics=dict(body.get("metrics", {})),
                        finished_at_ms=wall_clock_ms(),
                    )
                )

    def log_start(self, model: torch.nn.Module, done_rounds: int) -> None:
        digest = arrays_digest(self.numpy_state(model))
        if done_rounds or self.provenance.has_started():
            self.provenance.job_resumed("federated", done_rounds, model_digest=digest)
            return
        self.provenance.job_started(
            JobStarted(
                job_id=self.job_id,
                kind="federated",
                spec=self.spec.model_dump(mode="json"),
                seed=self.spec.seed,
                strategy={"sampler": self.spec.strategy, **rule_of(self.spec).describe()},
                environment=describe_environment("cpu", deterministic=True),
                model={"name": self.family.model, "options": self.family.options},
                workload=workload_source(self.family.model).describe(),
                init_from=(
                    {"job_id": self.starting.job_id, "model_digest": self.starting.digest}
                    if self.starting is not None
                    else None
                ),
                initial_model_digest=digest,
            )
        )

    def log_round(
        self, strategy: ConsortiumStrategy, round_: int, metrics: dict[str, float]
    ) -> None:
        record = strategy.rounds.get(round_)
        if record is None:
            return
        for update in record.accepted:
            self.provenance.institution_key(update.institution, update.key_id, update.public_key)
        self.provenance.round(
            Round.model_validate(
                {
                    "job_id": self.job_id,
                    "round": round_,
                    "global_digest": record.global_digest,
                    "participants": record.participants,
                    "updates": record.updates,
                    "aggregation": record.aggregation or rule_of(self.spec).describe(),
                    "aggregate_digest": record.aggregate_digest,
                    "metrics": finite_metrics(metrics),
                }
            )
        )
        # The sites' cosignatures of the head this round was sent with (checked on
        # admission): written after the commit, so a refused commit records none.
        self.provenance.cosignatures(
            [u.cosignature for u in record.accepted if u.cosignature is not None]
        )

    def run(self, grid: Grid) -> None:
        model, done_rounds = self.initial_model()
        self.log_start(model, done_rounds)
        strategy = ConsortiumStrategy(
            make_sampler(self.spec),
            self.job_id,
            self.job,
            rule_of(self.spec),
            round_offset=done_rounds,
            retention_dir=self.data_dir if self.spec.retain_updates else None,
            min_accepted=self.spec.min_clients,
            round_timeout_s=self.spec.round_timeout_s,
            institution_of_node=self.job.institution_of_node,
            witness_log=WitnessLog(self.provenance.log.path, self.provenance.coordinator_key_id),
        )

        def evaluate_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            self.workload.load_exchanged(model, arrays.to_torch_state_dict())
            # A diverged model evaluates to NaN: state and the log never see it.
            held_out = self.held_out.evaluate(model) if self.held_out is not None else {}
            metrics = finite_metrics(held_out)
            round_ = done_rounds + server_round
            provenance = strategy.rounds.get(round_)
            if provenance is not None and provenance.train_loss is not None:
                metrics["train_loss"] = provenance.train_loss
            if server_round > 0 or done_rounds == 0:
                if server_round > 0:
                    self.current_round = round_
                    self.checkpoints.save(round_, self.workload.exchanged(model))
                    self.log_round(strategy, round_, metrics)  # the commit
                    self.checkpoints.prune_before(round_)
                self.job.record_round(
                    RoundRecord(
                        job_id=self.job_id,
                        round=round_,
                        participants=len(provenance.participants) if provenance else 0,
                        metrics=metrics,
                        finished_at_ms=wall_clock_ms(),
                    )
                )
            if self.job.is_cancelled():
                raise JobCancelledError(self.job_id)
            return MetricRecord(dict[str, int | float | list[int] | list[float]](metrics))

        remaining = self.spec.rounds - done_rounds
        if remaining > 0:
            config = ConfigRecord(
                {
                    "local-epochs": self.spec.local_epochs,
                    "learning-rate": self.spec.learning_rate,
                    "batch-size": self.spec.batch_size,
                    "seed": self.spec.seed,
                    "round-offset": done_rounds,
                    "workload": self.family.model,
                    "model-options": json.dumps(self.family.options, sort_keys=True),
                    "dataset": self.spec.dataset,
                    "local-steps": self.spec.local_steps,
                    "seq-len": self.spec.seq_len,
                }
            )
            result = strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(self.workload.exchanged(model)),
                num_rounds=remaining,
                timeout=self.spec.round_timeout_s,
                train_config=config,
                evaluate_fn=evaluate_round,
            )
            if len(result.arrays) > 0:
                self.workload.load_exchanged(model, result.arrays.to_torch_state_dict())
        self.finish(model, grid)

    def finish(self, model: torch.nn.Module, grid: Grid) -> None:
        model_path = DataDir(self.data_dir).model_file(self.job_id)
        save_model(
            model_path,
            dict(self.workload.exchanged(model)),
            {"job_id": self.job_id, "model": self.family.model, "rounds": str(self.spec.rounds)},
        )
        self.provenance.job_completed(
            "federated", self.spec.rounds, arrays_digest(self.numpy_state(model)), model_path
        )
        # The sites cosign the head over the final record too, so the latest head of a
        # finished job is witnessed (`provenance verify --min-witnesses`).
        witnesses = witness_latest_head(
            grid,
            self.provenance,
            self.job,
            min(self.spec.round_timeout_s or FINAL_WITNESS_TIMEOUT_S, FINAL_WITNESS_TIMEOUT_S),
        )
        log.info("job %s: the final head is cosigned by %s", self.job_id, witnesses or "no site")
        self.job.succeed(f"completed {self.spec.rounds} rounds", str(model_path))


@app.main()
def main(grid: Grid, context: Context) -> None:
    data_dir = Path(os.environ[DATA_DIR_ENV])
    job_id = str(context.run_config["job-id"])
    run_id = str(context.run_id)
    with RunningJob.open(DataDir(data_dir), job_id, run_id) as job:
        run: JobRun | FederatedPretrainRun | None = None
        try:
            if isinstance(job.spec, PretrainJobSpec):  # DiLoCo at the sites
                # Imported here: DiLoCo's site driver and its pretraining imports are
                # 0.4 s of CPU that a fine-tuning ServerApp would pay for nothing.
                from coordinator.federated.pretrain_run import FederatedPretrainRun

                run = FederatedPretrainRun(data_dir, job, job.spec)
            else:
                run = JobRun(data_dir, job, job.spec)
            run.run(PromptGrid(grid))  # replies as they come, not every 3 s
        except JobCancelledError:
            log.info("job %s no longer runs; stopping", job_id)
        except (TooFewUpdatesError, PretrainFailedError) as too_few:
            log.error("job %s fails: %s", job_id, too_few)
            try:
                job.fail(str(too_few))
            except ConflictError:
                log.info("job %s is not this run's, or ended; its failure is not recorded", job_id)
        except CommitRefusedError as refusal:
            # Not this run's to write, nor to fail: the job goes on in its owner's run.
            round_ = run.current_round if run is not None else 0
            log.error("Flower run %s stops: %s (%s)", run_id, refusal, refusal.reason)
            job.record_refused_commit(refusal.reason, round_)
        except (ObjectPushError, grpc.RpcError) as lost:
            # The SuperLink went away under the run (a restart): not the job's failure.
            # The run ends; the coordinator resumes the job in a new run after its last
            # committed round (coordinator/federated/runner.py).
            log.error("Flower run %s lost its SuperLink (%s); the job resumes", run_id, lost)
            raise
        except Exception as error:
            try:
                job.fail(f"ServerApp failed: {type(error).__name__}: {error}")
            except ConflictError:
                log.info("job %s is not this run's, or ended; its failure is not recorded", job_id)
            raise
