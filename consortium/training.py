"""Plain supervised training and evaluation loops shared by both roles.

The ClientApp trains with `train_local`; the coordinator's ServerApp evaluates
the global model with `evaluate`. Batches are drawn from a seeded generator so
a round's local training is repeatable given (seed, round, site).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional

from consortium.optim import SGD


@dataclass(frozen=True)
class LocalTrainingConfig:
    epochs: int
    learning_rate: float
    batch_size: int
    seed: int
    proximal_mu: float = 0.0  # FedProx: weight of ||w - w_global||^2 / 2


@dataclass(frozen=True)
class TrainingOutcome:
    mean_loss: float
    num_examples: int


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    num_examples: int


def train_local(
    model: nn.Module,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    config: LocalTrainingConfig,
    device: torch.device,
) -> TrainingOutcome:
    model.to(device)
    model.train()
    inputs = torch.from_numpy(x).to(device)
    labels = torch.from_numpy(y).to(device)
    global_params = [p.detach().clone() for p in model.parameters()]
    optimizer = SGD(model.parameters(), lr=config.learning_rate, momentum=0.9)
    generator = torch.Generator().manual_seed(config.seed)
    total_loss, seen = 0.0, 0
    for _ in range(config.epochs):
        order = torch.randperm(len(labels), generator=generator).to(device)
        for start in range(0, len(labels), config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad()
            loss = functional.cross_entropy(model(inputs[batch]), labels[batch])
            total_loss += float(loss.detach()) * len(batch)
            seen += len(batch)
            if config.proximal_mu > 0:
                proximal = sum(
                    ((p - g) ** 2).sum()
                    for p, g in zip(model.parameters(), global_params, strict=True)
                )
                loss = loss + (config.proximal_mu / 2) * proximal
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    model.to("cpu")
    return TrainingOutcome(mean_loss=total_loss / max(seen, 1), num_examples=len(labels))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    device: torch.device | None = None,
) -> Evaluation:
    device = device or torch.device("cpu")
    model.to(device)
    model.eval()
    logits = model(torch.from_numpy(x).to(device))
    labels = torch.from_numpy(y).to(device)
    loss = float(functional.cross_entropy(logits, labels))
    accuracy = float((logits.argmax(dim=1) == labels).float().mean())
    model.to("cpu")
    return Evaluation(loss=loss, accuracy=accuracy, num_examples=len(y))
