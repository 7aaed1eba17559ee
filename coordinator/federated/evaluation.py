"""The coordinator's own, public held-out data for each federated dataset, and how a
global model is scored on it after every round."""

from __future__ import annotations

from typing import Protocol

import torch

from consortium.data.digits import train_test_split
from consortium.data.docstrings import DEFAULT_BYTES_PER_PACKAGE, held_out_text
from consortium.lm import perplexity, validation_loss
from consortium.training import evaluate
from coordinator.jobs.spec import FederatedJobSpec

EVAL_BATCH_SIZE = 32


class HeldOut(Protocol):
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Metrics of ``model`` on the held-out split."""
        ...


class DigitsHeldOut:
    """scikit-learn's digits test split: cross-entropy and accuracy."""

    def __init__(self) -> None:
        _, self.test = train_test_split()

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        result = evaluate(model, self.test.x, self.test.y)
        return {"eval_loss": result.loss, "eval_accuracy": result.accuracy}


class TextHeldOut:
    """Held-out docstrings of every package: next-byte loss (nats) and perplexity."""

    def __init__(self, seq_len: int, eval_batches: int) -> None:
        self.text = held_out_text(DEFAULT_BYTES_PER_PACKAGE)
        self.seq_len = seq_len
        self.eval_batches = eval_batches

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        loss = validation_loss(model, self.text, self.seq_len, EVAL_BATCH_SIZE, self.eval_batches)
        return {"eval_loss": loss, "eval_perplexity": perplexity(loss)}


def held_out_for(spec: FederatedJobSpec) -> HeldOut:
    if spec.is_text:
        return TextHeldOut(spec.seq_len, spec.eval_batches)
    return DigitsHeldOut()
