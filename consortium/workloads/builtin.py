"""The two built-in workloads, registered in pyproject.toml like any other package's:
`digits-cnn` (a small CNN on scikit-learn's digits; a site's `digits` arrays) and
`bytelm` (the byte-level language model; a site's `docstrings` text, fine-tuned with
AdamW). Both exchange every parameter. torch is imported inside the methods: the
coordinator loads workloads to check specs without importing it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from consortium.data.site_loaders import LocalDataset, LocalText, load_dataset, load_text
from consortium.models import (
    PARAMETER_COUNTS,
    build_model,
    load_parameter_tensors,
    parameter_tensors,
)
from consortium.workloads import EvalResult, HeldOut, RoundBudget, TrainResult, WorkloadOptions

if TYPE_CHECKING:
    import torch
    from torch import nn

# Language models: held-out windows per evaluation batch (the coordinator's and a site's).
EVAL_BATCH_SIZE = 32


class _AllParameters:
    """Every parameter travels (tied weights once), so a site may keep the model loaded
    between a job's rounds: each message overwrites all of it."""

    model_name: str
    keep_model_loaded = True

    def parameter_count(self, options: WorkloadOptions) -> int:
        return PARAMETER_COUNTS[self.model_name](options)

    def build_model(self, options: WorkloadOptions) -> nn.Module:
        return build_model(self.model_name, options)

    def exchanged(self, model: nn.Module) -> OrderedDict[str, torch.Tensor]:
        return parameter_tensors(model)

    def load_exchanged(self, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        load_parameter_tensors(model, tensors)


class DigitsCNN(_AllParameters):
    model_name = "digits-cnn"
    datasets = frozenset({"digits"})

    def load_site_data(self, data_dir: Path, dataset: str) -> LocalDataset:
        return load_dataset(data_dir, dataset)

    def train(
        self,
        model: nn.Module,
        data: LocalDataset,
        budget: RoundBudget,
        device: torch.device,
        commitment_key: bytes,
    ) -> TrainResult:
        from consortium.provenance.commitment import commit
        from consortium.training import LocalTrainingConfig, train_local

        outcome = train_local(
            model,
            data.x,
            data.y,
            LocalTrainingConfig(
                epochs=budget.epochs,
                learning_rate=budget.learning_rate,
                batch_size=budget.batch_size,
                seed=budget.seed,
                proximal_mu=budget.proximal_mu,
            ),
            device,
        )
        commitment = commit(data.name, data.x, data.y, commitment_key)
        return TrainResult(outcome.num_examples, outcome.mean_loss, commitment)

    def evaluate(
        self, model: nn.Module, data: LocalDataset, budget: RoundBudget, device: torch.device
    ) -> EvalResult:
        from consortium.training import evaluate

        result = evaluate(model, data.x, data.y, device)
        return EvalResult(
            result.num_examples, {"eval_loss": result.loss, "eval_accuracy": result.accuracy}
        )

    def held_out(self, dataset: str, budget: RoundBudget, eval_batches: int) -> HeldOut:
        return _DigitsHeldOut()


class _DigitsHeldOut:
    """scikit-learn's digits test split: cross-entropy and accuracy."""

    def __init__(self) -> None:
        from consortium.data.digits import train_test_split

        _, self.test = train_test_split()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from consortium.training import evaluate

        result = evaluate(model, self.test.x, self.test.y)
        return {"eval_loss": result.loss, "eval_accuracy": result.accuracy}


class ByteLM(_AllParameters):
    model_name = "bytelm"
    datasets = frozenset({"docstrings"})

    def load_site_data(self, data_dir: Path, dataset: str) -> LocalText:
        return load_text(data_dir, dataset)

    def train(
        self,
        model: nn.Module,
        data: LocalText,
        budget: RoundBudget,
        device: torch.device,
        commitment_key: bytes,
    ) -> TrainResult:
        from consortium.lm import FineTuneConfig, fine_tune
        from consortium.provenance.commitment import commit_text

        tuned = fine_tune(
            model,
            data.data,
            FineTuneConfig(
                steps=budget.steps,
                batch_size=budget.batch_size,
                seq_len=budget.seq_len,
                learning_rate=budget.learning_rate,
                seed=budget.seed,
                proximal_mu=budget.proximal_mu,
            ),
            device,
        )
        commitment = commit_text(data.name, data.text, commitment_key)
        return TrainResult(tuned.windows, tuned.mean_loss, commitment)

    def evaluate(
        self, model: nn.Module, data: LocalText, budget: RoundBudget, device: torch.device
    ) -> EvalResult:
        from consortium.lm import perplexity, validation_loss

        max_batches = 16
        loss = validation_loss(
            model.to(device), data.data, budget.seq_len, EVAL_BATCH_SIZE, max_batches, device
        )
        count = min((data.data.size - 1) // budget.seq_len, EVAL_BATCH_SIZE * max_batches)
        return EvalResult(count, {"eval_loss": loss, "eval_perplexity": perplexity(loss)})

    def held_out(self, dataset: str, budget: RoundBudget, eval_batches: int) -> HeldOut:
        return _TextHeldOut(budget.seq_len, eval_batches)


class _TextHeldOut:
    """Held-out docstrings of every package: next-byte loss (nats) and perplexity."""

    def __init__(self, seq_len: int, eval_batches: int) -> None:
        from consortium.data.docstrings import DEFAULT_BYTES_PER_PACKAGE, held_out_text

        self.text = held_out_text(DEFAULT_BYTES_PER_PACKAGE)
        self.seq_len = seq_len
        self.eval_batches = eval_batches

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from consortium.lm import perplexity, validation_loss

        loss = validation_loss(model, self.text, self.seq_len, EVAL_BATCH_SIZE, self.eval_batches)
        return {"eval_loss": loss, "eval_perplexity": perplexity(loss)}


digits_cnn = DigitsCNN()
bytelm = ByteLM()
