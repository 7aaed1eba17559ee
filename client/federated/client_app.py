"""ClientApp run by the site's SuperNode for every training message.

The SuperNode's node config says where the site's data lives and which device
to use; the message's config names the model and dataset. Only weights and
counts go back to the coordinator.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.data.loaders import load_dataset
from client.federated.signing_mod import COMMITMENT_RECORD, signing_mod
from client.metrics import record_training
from consortium.models import build_model
from consortium.provenance.commitment import commit, load_or_create_key
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
    model = build_model(str(config["model"]))
    model.load_state_dict(arrays.to_torch_state_dict())
    device = torch.device(str(context.node_config.get("device", "cpu")))
    return model, device, Path(str(context.node_config["data-dir"])), config


@app.train()
def train(msg: Message, context: Context) -> Message:
    model, device, data_dir, config = _setup(msg, context)
    dataset = load_dataset(data_dir, str(config["dataset"]))
    institution = str(context.node_config.get("institution", ""))
    round_ = int(_number(config, "server-round")) + int(_number(config, "round-offset", 0))
    seed = int(_number(config, "seed")) * 1_000_003 + round_ * 1_009
    seed += zlib.crc32(institution.encode())
    started = time.monotonic()
    outcome = train_local(
        model,
        dataset.x,
        dataset.y,
        LocalTrainingConfig(
            epochs=int(_number(config, "local-epochs")),
            learning_rate=_number(config, "learning-rate"),
            batch_size=int(_number(config, "batch-size")),
            seed=seed % 2**63,
            proximal_mu=_number(config, "proximal-mu", 0.0),
        ),
        device,
    )
    record_training(
        Path(str(context.node_config["state-dir"])),
        time.monotonic() - started,
        outcome.num_examples,
    )
    key = load_or_create_key(Path(str(context.node_config["commitment-key"])))
    commitment = commit(dataset.name, dataset.x, dataset.y, key)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {"num-examples": outcome.num_examples, "train_loss": outcome.mean_loss}
            ),
            COMMITMENT_RECORD: ConfigRecord(
                {
                    "dataset": commitment.dataset,
                    "count": commitment.count,
                    "schema-digest": commitment.schema_digest,
                    "commitment": commitment.commitment,
                    "digest": commitment.digest(),
                }
            ),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def local_evaluate(msg: Message, context: Context) -> Message:
    model, device, data_dir, config = _setup(msg, context)
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
