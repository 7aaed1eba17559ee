"""Softmax regression on a site's `digits` arrays, written against docs/workloads.md only.

Every method follows the workload protocol (`consortium.workloads.Workload`); torch is
imported inside them, so the coordinator can check a spec naming this workload without
importing it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from consortium.data.site_loaders import LocalDataset, load_dataset
from consortium.provenance.commitment import commit
from consortium.workloads import EvalResult, RoundBudget, TrainResult

if TYPE_CHECKING:
    import torch
    from torch import nn

PIXELS = 64
CLASSES = 10


class SoftmaxDigits:
    datasets = frozenset({"digits"})

    def parameter_count(self, options: Mapping[str, int]) -> int:
        if options:
            raise ValueError(f"softmax-digits takes no options, got {sorted(options)}")
        return PIXELS * CLASSES + CLASSES

    def build_model(self, options: Mapping[str, int]) -> nn.Module:
        from torch import nn

        self.parameter_count(options)
        return nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, CLASSES))

    def exchanged(self, model: nn.Module) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((name, p.detach()) for name, p in model.named_parameters())

    def load_exchanged(self, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        import torch

        own = dict(model.named_parameters())
        if set(own) != set(tensors):
            raise ValueError(f"expected tensors {sorted(own)}, got {sorted(tensors)}")
        with torch.no_grad():
            for name, param in own.items():
                if tuple(tensors[name].shape) != tuple(param.shape):
                    raise ValueError(f"{name}: shape {tuple(tensors[name].shape)}")
                param.copy_(tensors[name])

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
        import torch
        from torch.nn import functional

        model.to(device).train()
        x = torch.from_numpy(data.x).to(device)
        y = torch.from_numpy(data.y).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=budget.learning_rate)
        generator = torch.Generator().manual_seed(budget.seed)
        total, seen = 0.0, 0
        for _ in range(budget.epochs):
            order = torch.randperm(len(y), generator=generator).to(device)
            for start in range(0, len(y), budget.batch_size):
                batch = order[start : start + budget.batch_size]
                optimizer.zero_grad()
                loss = functional.cross_entropy(model(x[batch]), y[batch])
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
        model.to("cpu")
        return TrainResult(
            examples=len(y),
            loss=total / max(seen, 1),
            commitment=commit(data.name, data.x, data.y, commitment_key),
        )

    def evaluate(
        self, model: nn.Module, data: LocalDataset, budget: RoundBudget, device: torch.device
    ) -> EvalResult:
        return EvalResult(len(data.y), _scores(model, data.x, data.y))

    def held_out(self, dataset: str, budget: RoundBudget, eval_batches: int) -> _TestSplit:
        return _TestSplit()


class _TestSplit:
    """The digits test split Consortium's built-in workload is scored on: public, and
    disjoint from the training pool the demo's sites are given their shares of."""

    def __init__(self) -> None:
        from consortium.data.digits import train_test_split

        _, test = train_test_split()
        self.x, self.y = test.x, test.y

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return _scores(model, self.x, self.y)


def _scores(model: nn.Module, x: object, y: object) -> dict[str, float]:
    import torch
    from torch.nn import functional

    with torch.no_grad():
        model.eval()
        logits = model(torch.as_tensor(x))
        labels = torch.as_tensor(y)
        loss = float(functional.cross_entropy(logits, labels))
        accuracy = float((logits.argmax(dim=1) == labels).float().mean())
    return {"eval_loss": loss, "eval_accuracy": accuracy}
