"""ClientApp run by the site's SuperNode for every training message.

The SuperNode's node config says where the site's data lives and which device
to use; the message's config names the model and dataset. Only weights and
counts go back to the coordinator.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.data.loaders import load_dataset, load_text
from client.federated.signing_mod import COMMITMENT_RECORD, signing_mod
from client.metrics import record_training
from consortium.lm import FineTuneConfig, fine_tune, perplexity, validation_loss
from consortium.models import build_model, load_parameter_tensors, parameter_tensors
from consortium.provenance.commitment import (
    DataCommitment,
    commit,
    commit_text,
    load_or_create_key,
)
from consortium.training import LocalTrainingConfig, evaluate, train_local

app = ClientApp(mods=[signing_mod])


def _number(config: Mapping[str, object], key: str, default: float | None = None) -> float:
    value = config.get(key, default)
    if not isinstance(value, int | float):
        raise ValueError(f"config {key!r} must be a number, got {value!r}")
    return float(value)


def _setup(
    msg: Message, context: Context
) -> tuple[torch.nn.Module, torch.device, Path, ConfigRecord]:
    torch.set_num_threads(int(_number(context.node_config, "torch-threads", 1)))
    config = msg.content.config_records["config"]
    arrays: ArrayRecord = msg.content.array_records["arrays"]
    options = json.loads(str(config.get("model-options", "{}")))
    model = build_model(str(config["model"]), options)
    load_parameter_tensors(model, arrays.to_torch_state_dict())
    device = torch.device(str(context.node_config.get("device", "cpu")))
    return model, device, Path(str(context.node_config["data-dir"])), config


@app.train()
def train(msg: Message, context: Context) -> Message:
    model, device, data_dir, config = _setup(msg, context)
    institution = str(context.node_config.get("institution", ""))
    round_ = int(_number(config, "server-round")) + int(_number(config, "round-offset", 0))
    seed = int(_number(config, "seed")) * 1_000_003 + round_ * 1_009
    seed = (seed + zlib.crc32(institution.encode())) % 2**63
    key = load_or_create_key(Path(str(context.node_config["commitment-key"])))
    started = time.monotonic()
    if _is_text(config):
        text = load_text(data_dir, str(config["dataset"]))
        tuned = fine_tune(
            model,
            text.data,
            FineTuneConfig(
                steps=int(_number(config, "local-steps")),
                batch_size=int(_number(config, "batch-size")),
                seq_len=int(_number(config, "seq-len")),
                learning_rate=_number(config, "learning-rate"),
                seed=seed,
                proximal_mu=_number(config, "proximal-mu", 0.0),
            ),
            device,
        )
        mean_loss, examples = tuned.mean_loss, tuned.windows
        commitment = commit_text(text.name, text.text, key)
    else:
        dataset = load_dataset(data_dir, str(config["dataset"]))
        outcome = train_local(
            model,
            dataset.x,
            dataset.y,
            LocalTrainingConfig(
                epochs=int(_number(config, "local-epochs")),
                learning_rate=_number(config, "learning-rate"),
                batch_size=int(_number(config, "batch-size")),
                seed=seed,
                proximal_mu=_number(config, "proximal-mu", 0.0),
            ),
            device,
        )
        mean_loss, examples = outcome.mean_loss, outcome.num_examples
        commitment = commit(dataset.name, dataset.x, dataset.y, key)
    record_training(
        Path(str(context.node_config["state-dir"])), time.monotonic() - started, examples
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(parameter_tensors(model)),
            "metrics": MetricRecord({"num-examples": examples, "train_loss": mean_loss}),
            COMMITMENT_RECORD: _commitment_record(commitment),
        }
    )
    return Message(content=content, reply_to=msg)


def _is_text(config: ConfigRecord) -> bool:
    return str(config.get("task", "classification")) == "text"


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


@app.query("witness")
def witness(msg: Message, context: Context) -> Message:
    """A request to cosign the log's head alone: `signing_mod` checks and cosigns it."""
    return Message(content=RecordDict({}), reply_to=msg)


@app.evaluate()
def local_evaluate(msg: Message, context: Context) -> Message:
    model, device, data_dir, config = _setup(msg, context)
    if _is_text(config):
        text = load_text(data_dir, str(config["dataset"]))
        seq_len = int(_number(config, "seq-len"))
        loss = validation_loss(model.to(device), text.data, seq_len, 32, 16, device)
        count = min((text.data.size - 1) // seq_len, 32 * 16)
        metrics = MetricRecord(
            {"num-examples": count, "eval_loss": loss, "eval_perplexity": perplexity(loss)}
        )
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
    dataset = load_dataset(data_dir, str(config["dataset"]))
    result = evaluate(model, dataset.x, dataset.y, device)
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "eval_loss": result.loss,
            "eval_accuracy": result.accuracy,
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
