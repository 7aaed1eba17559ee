"""The ServerApp that runs one federated job on the SuperLink.

`coordinator serve` submits it with `flwr run` (run config: job-id); it reads
the job spec from the coordinator's state, runs the Flower strategy named in
the spec, evaluates the global model on the held-out split after every round,
records each round and a checkpoint, and saves the final model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from consortium.data.digits import train_test_split
from consortium.models import build_model
from consortium.training import evaluate
from coordinator.federated.checkpoints import CheckpointStore, save_model
from coordinator.federated.recording import RecordingStrategy
from coordinator.federated.superlink import DATA_DIR_ENV
from coordinator.jobs.spec import FederatedJobSpec, parse_job_spec
from coordinator.state import JobState, RoundRecord, SqliteStateStore, StateStore
from coordinator.state.sqlite_store import now_ms

log = logging.getLogger(__name__)

app = ServerApp()


class JobCancelledError(Exception):
    """The job was cancelled while running; stop the strategy loop."""


def make_strategy(spec: FederatedJobSpec) -> Strategy:
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


class JobRun:
    """Everything one ServerApp run needs, wired to the coordinator's state."""

    def __init__(self, data_dir: Path, store: StateStore, job_id: str) -> None:
        self.data_dir = data_dir
        self.store = store
        self.job_id = job_id
        self.spec = parse_job_spec(store.get_job(job_id).spec_toml)
        self.checkpoints = CheckpointStore(data_dir, job_id)
        _, self.test = train_test_split()

    def initial_model(self) -> tuple[torch.nn.Module, int]:
        torch.manual_seed(self.spec.seed)
        model = build_model(self.spec.model)
        checkpoint = self.checkpoints.latest()
        if checkpoint is None:
            return model, 0
        model.load_state_dict(checkpoint.state_dict)
        log.info("job %s resumes after round %d", self.job_id, checkpoint.round)
        return model, checkpoint.round

    def run(self, grid: Grid) -> None:
        model, done_rounds = self.initial_model()
        strategy = RecordingStrategy(make_strategy(self.spec))
        remaining = self.spec.rounds - done_rounds

        def evaluate_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            result = evaluate(model, self.test.x, self.test.y)
            metrics: dict[str, float] = {
                "eval_loss": result.loss,
                "eval_accuracy": result.accuracy,
            }
            if server_round in strategy.train_loss:
                metrics["train_loss"] = strategy.train_loss[server_round]
            if server_round > 0 or done_rounds == 0:
                round_ = done_rounds + server_round
                if server_round > 0:
                    self.checkpoints.save(round_, model.state_dict())
                self.store.record_round(
                    RoundRecord(
                        job_id=self.job_id,
                        round=round_,
                        participants=strategy.participants.get(server_round, 0),
                        metrics=metrics,
                        finished_at_ms=now_ms(),
                    )
                )
            if self.store.get_job(self.job_id).state is JobState.CANCELLED:
                raise JobCancelledError(self.job_id)
            return MetricRecord(dict[str, int | float | list[int] | list[float]](metrics))

        if remaining > 0:
            config = ConfigRecord(
                {
                    "local-epochs": self.spec.local_epochs,
                    "learning-rate": self.spec.learning_rate,
                    "batch-size": self.spec.batch_size,
                    "seed": self.spec.seed,
                    "round-offset": done_rounds,
                    "model": self.spec.model,
                    "dataset": self.spec.dataset,
                }
            )
            result = strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(model.state_dict()),
                num_rounds=remaining,
                timeout=self.spec.round_timeout_s,
                train_config=config,
                evaluate_fn=evaluate_round,
            )
            model.load_state_dict(result.arrays.to_torch_state_dict())
        model_path = self.data_dir / "models" / f"{self.job_id}.safetensors"
        save_model(
            model_path,
            model.state_dict(),
            {"job_id": self.job_id, "model": self.spec.model, "rounds": str(self.spec.rounds)},
        )
        self.store.update_job(
            self.job_id,
            state=JobState.SUCCEEDED,
            message=f"completed {self.spec.rounds} rounds",
            model_path=str(model_path),
            finished_at_ms=now_ms(),
            expect_states=frozenset({JobState.RUNNING}),
        )


@app.main()
def main(grid: Grid, context: Context) -> None:
    data_dir = Path(os.environ[DATA_DIR_ENV])
    job_id = str(context.run_config["job-id"])
    store = SqliteStateStore(data_dir / "state.db")
    try:
        JobRun(data_dir, store, job_id).run(grid)
    except JobCancelledError:
        log.info("job %s was cancelled; stopping", job_id)
    except Exception as error:
        store.update_job(
            job_id,
            state=JobState.FAILED,
            message=f"ServerApp failed: {type(error).__name__}: {error}",
            finished_at_ms=now_ms(),
            expect_states=frozenset({JobState.RUNNING}),
        )
        raise
    finally:
        store.close()
