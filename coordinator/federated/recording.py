"""A Message-API strategy wrapper that records who took part in each round.

It delegates every decision to the wrapped Flower strategy (FedAvg, FedProx)
and keeps what the coordinator stores per round: the participants whose
replies carried content, and their example-weighted training loss.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class RecordingStrategy(Strategy):
    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.participants: dict[int, int] = {}
        self.train_loss: dict[int, float] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages: Iterable[Message] = self.inner.configure_train(server_round, arrays, config, grid)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = [r for r in replies if not r.has_error() and r.has_content()]
        self.participants[server_round] = len(ok)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if metrics is not None and "train_loss" in metrics:
            value = metrics["train_loss"]
            if isinstance(value, int | float):
                self.train_loss[server_round] = float(value)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages: Iterable[Message] = self.inner.configure_evaluate(
            server_round, arrays, config, grid
        )
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        result: MetricRecord | None = self.inner.aggregate_evaluate(server_round, replies)
        return result
