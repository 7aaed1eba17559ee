"""FedAvg over every node, evaluating centrally on the digits test split after each
round and appending the round's wall-clock time to `times-file`."""

from __future__ import annotations

import json
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from consortium.data.digits import train_test_split
from consortium.models import build_model, load_parameter_tensors, parameter_tensors
from consortium.training import evaluate

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    rounds = int(config["num-server-rounds"])
    times_file = str(config["times-file"])
    torch.manual_seed(int(config["seed"]))
    model = build_model("digits-cnn")
    _, test = train_test_split()

    def evaluate_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_parameter_tensors(model, arrays.to_torch_state_dict())
        result = evaluate(model, test.x, test.y)
        if times_file:
            line = {"round": server_round, "t": time.time(), "accuracy": result.accuracy}
            with open(times_file, "a") as out:
                out.write(json.dumps(line) + "\n")
        return MetricRecord({"eval_loss": result.loss, "eval_accuracy": result.accuracy})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(parameter_tensors(model)),
        num_rounds=rounds,
        train_config=ConfigRecord(
            {
                "local-epochs": int(config["local-epochs"]),
                "learning-rate": float(config["learning-rate"]),
                "batch-size": int(config["batch-size"]),
                "seed": int(config["seed"]),
            }
        ),
        evaluate_fn=evaluate_round,
    )
