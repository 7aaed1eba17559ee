"""ClientApp run by the site's SuperNode for every training message.

The SuperNode's node config says where the site's data lives, which device to use and
which workloads the site runs; the message's config names the workload and dataset.
Every workload-specific step (model, data, training, evaluation, what travels) is the
workload's (consortium/workloads). Only the exchanged tensors, counts and the data
commitment go back to the coordinator.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.federated.diloco_task import run_diloco_step
from client.federated.signing_mod import COMMITMENT_RECORD, signing_mod
from client.federated.site_trainer import SiteTrainer
from client.metrics import record_training
from consortium.data.site_loaders import available_datasets
from consortium.errors import TaskRefusedError
from consortium.model_wire import ARRAYS_RECORD, pack_tensors, unpack_torch
from consortium.models import MAX_PARAMETERS, step_tokens_problem
from consortium.provenance.commitment import DataCommitment, load_or_create_key
from consortium.workloads import (
    BUILTIN_WORKLOADS,
    RoundBudget,
    Workload,
    WorkloadOptions,
    allowed_workloads,
    check_allowed,
    load_workload,
)

log = logging.getLogger(__name__)
app = ClientApp(mods=[signing_mod])
PRETRAIN_WORKLOAD = "bytelm"  # federated pretraining trains the byte-level LM
# What stays loaded between messages in `client join`'s process (site_trainer.py).
TRAINER = SiteTrainer()


def _number(config: Mapping[str, object], key: str, default: float | None = None) -> float:
    value = config.get(key, default)
    if not isinstance(value, int | float):
        raise TaskRefusedError(f"config {key!r} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Task:
    workload: Workload
    model: torch.nn.Module
    device: torch.device
    data: Any  # the site's dataset, as the workload reads it
    config: ConfigRecord
    budget: RoundBudget


def _setup(msg: Message, context: Context, seed: int = 0) -> Task:
    """The message's workload (one this site allows), its model with the message's
    weights, and the round's budget."""
    torch.set_num_threads(int(_number(context.node_config, "torch-threads", 1)))
    config = msg.content.config_records["config"]
    name = str(config.get("workload", config.get("model", "")))
    check_allowed(
        name,
        allowed_workloads(str(context.node_config.get("workloads", ",".join(BUILTIN_WORKLOADS)))),
        str(context.node_config.get("institution", "")),
    )
    workload = load_workload(name)
    options = _bounded_options(config, name, workload)
    model = TRAINER.model(msg.metadata.run_id, name, workload, options)
    workload.load_exchanged(model, unpack_torch(msg.content.array_records[ARRAYS_RECORD]))
    budget = RoundBudget(
        epochs=int(_number(config, "local-epochs", 1)),
        steps=int(_number(config, "local-steps", 1)),
        batch_size=int(_number(config, "batch-size", 32)),
        learning_rate=_number(config, "learning-rate", 0.05),
        seed=seed,
        proximal_mu=_number(config, "proximal-mu", 0.0),
        seq_len=int(_number(config, "seq-len", 64)),
    )
    # What the coordinator's spec check holds it to, held here too: a dishonest
    # coordinator sends what it likes, and a step too large takes `client join` down.
    if (problem := step_tokens_problem(budget.batch_size, budget.seq_len)) is not None:
        raise TaskRefusedError(problem)
    device = torch.device(str(context.node_config.get("device", "cpu")))
    data_dir = Path(str(context.node_config["data-dir"]))
    data = TRAINER.data(msg.metadata.run_id, name, workload, data_dir, _offered(config, data_dir))
    return Task(workload, model, device, data, config, budget)


def _bounded_options(config: ConfigRecord, name: str, workload: Workload) -> WorkloadOptions:
    """The message's model options, if the model they make is within MAX_PARAMETERS: the
    coordinator checks its specs, but a site does not take its word for it, since a
    model built from options it chose (a trillion parameters) would take the site's
    memory and `client join` with it."""
    options = json.loads(str(config.get("model-options", "{}")))
    if not isinstance(options, dict):
        raise TaskRefusedError(f"config 'model-options' must be a JSON object, got {options!r}")
    count = workload.parameter_count(options)
    if count > MAX_PARAMETERS:
        raise TaskRefusedError(
            f"workload {name!r} with these options would have {count:,} parameters; this "
            f"site trains at most {MAX_PARAMETERS:,}"
        )
    return options


def _offered(config: ConfigRecord, data_dir: Path) -> str:
    """The dataset the message names, if it is one this site offers. The loaders join
    the name into a path (`<name>.npz`, `text/<name>.txt`): a name the coordinator chose
    freely ("../../home/x/notes", an absolute path) would make the site train on, and
    evaluate, any file its user can read, outside the data dir it agreed to share."""
    dataset = str(config.get("dataset", ""))
    offered = available_datasets(data_dir)
    if dataset not in offered:
        # Which datasets it does offer is the site's to know: said in its own log only.
        log.warning("a task named dataset %r; this site offers %s", dataset, offered or "none")
        raise TaskRefusedError(f"this site offers no dataset {dataset!r}")
    return dataset


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content.config_records["config"]
    institution = str(context.node_config.get("institution", ""))
    round_ = int(_number(config, "server-round")) + int(_number(config, "round-offset", 0))
    seed = int(_number(config, "seed")) * 1_000_003 + round_ * 1_009
    seed = (seed + zlib.crc32(institution.encode())) % 2**63
    task = _setup(msg, context, seed)
    key = load_or_create_key(Path(str(context.node_config["commitment-key"])))
    started = time.monotonic()
    result = task.workload.train(task.model, task.data, task.budget, task.device, key)
    record_training(
        Path(str(context.node_config["state-dir"])), time.monotonic() - started, result.examples
    )
    content = RecordDict(
        {
            ARRAYS_RECORD: pack_tensors(task.workload.exchanged(task.model)),
            "metrics": MetricRecord({"num-examples": result.examples, "train_loss": result.loss}),
            COMMITMENT_RECORD: _commitment_record(result.commitment),
        }
    )
    return Message(content=content, reply_to=msg)


def _commitment_record(commitment: DataCommitment) -> ConfigRecord:
    return ConfigRecord(
        {
            "dataset": commitment.dataset,
            "count": commitment.count,
            "schema-digest": commitment.schema_digest,
            "commitment": commitment.commitment,
            "digest": commitment.digest(),
        }
    )


@app.train("diloco")
def diloco(msg: Message, context: Context) -> Message:
    """One outer step of federated pretraining (client/federated/diloco_task.py): the
    byte-level LM's inner loop, if this site runs the bytelm workload."""
    check_allowed(
        PRETRAIN_WORKLOAD,
        allowed_workloads(str(context.node_config.get("workloads", ",".join(BUILTIN_WORKLOADS)))),
        str(context.node_config.get("institution", "")),
    )
    return run_diloco_step(msg, context.node_config)


@app.query("witness")
def witness(msg: Message, context: Context) -> Message:
    """A request to cosign the log's head alone: `signing_mod` checks and cosigns it."""
    return Message(content=RecordDict({}), reply_to=msg)


@app.evaluate()
def local_evaluate(msg: Message, context: Context) -> Message:
    task = _setup(msg, context)
    result = task.workload.evaluate(task.model, task.data, task.budget, task.device)
    metrics = MetricRecord({"num-examples": result.examples, **result.metrics})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
