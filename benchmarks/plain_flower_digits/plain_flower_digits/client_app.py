"""Local SGD on the node's digits partition (node config `data-file`: an .npz with x, y)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from consortium.models import build_model, load_parameter_tensors, parameter_tensors
from consortium.training import LocalTrainingConfig, train_local

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    config = msg.content.config_records["config"]
    model = build_model("digits-cnn")
    load_parameter_tensors(model, msg.content.array_records["arrays"].to_torch_state_dict())
    with np.load(str(context.node_config["data-file"])) as data:
        x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
    outcome = train_local(
        model,
        x,
        y,
        LocalTrainingConfig(
            epochs=int(str(config["local-epochs"])),
            learning_rate=float(str(config["learning-rate"])),
            batch_size=int(str(config["batch-size"])),
            seed=int(str(config["seed"])) + int(str(config["server-round"])),
        ),
        torch.device("cpu"),
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(parameter_tensors(model)),
            "metrics": MetricRecord(
                {"num-examples": outcome.num_examples, "train_loss": outcome.mean_loss}
            ),
        }
    )
    return Message(content=content, reply_to=msg)
