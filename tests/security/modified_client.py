"""A member institution's modified `client join`, for tests/security/test_flower_attacks.py.

A member controls its own node, so it can change its ClientApp. This one trains as the
installed ClientApp does, then alters its reply as `CONSORTIUM_TEST_ATTACK` says; the
signing mod still signs the reply with the institution's real key, so the coordinator
sees a correctly signed update. Run as `python -m tests.security.modified_client join ...`.
"""

from __future__ import annotations

import math
import os

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import client.federated.client_app as installed
from client.cli import app as client_cli
from client.federated.signing_mod import signing_mod

ATTACK_ENV = "CONSORTIUM_TEST_ATTACK"
NAN_LOSS = "nan_loss"  # a non-finite metric
INFLATED_COUNT = "inflated_count"  # far more examples than the site declared
INFLATED_EXAMPLES = 100_000


def attacked(reply: Message, attack: str) -> Message:
    metrics = reply.content.metric_records["metrics"]
    if attack == NAN_LOSS:
        metrics["train_loss"] = math.nan
    elif attack == INFLATED_COUNT:
        metrics["num-examples"] = INFLATED_EXAMPLES
    else:
        raise ValueError(f"unknown attack {attack!r}")
    return reply


def modified_app(attack: str) -> ClientApp:
    app = ClientApp(mods=[signing_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return attacked(installed.train(msg, context), attack)

    app.evaluate()(installed.local_evaluate)
    return app


if __name__ == "__main__":
    # `client join` takes the ClientApp from this module attribute when it starts.
    installed.app = modified_app(os.environ[ATTACK_ENV])
    client_cli(prog_name="client")
