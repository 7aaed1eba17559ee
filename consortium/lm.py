"""Byte-level language modelling shared by pretraining workers, federated sites and the
coordinator: seeded batches, held-out loss, weights by parameter name, and local
fine-tuning on a site's own text."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from consortium.optim import AdamW

Weights = dict[str, npt.NDArray[np.float32]]


def sample_batch(
    data: npt.NDArray[np.uint8],
    batch_size: int,
    seq_len: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``seq_len + 1`` bytes: inputs and next bytes."""
    starts = torch.randint(0, data.size - seq_len, (batch_size,), generator=generator)
    index = starts.numpy()[:, None] + np.arange(seq_len + 1)  # (B, T + 1)
    windows = torch.from_numpy(data[index].astype(np.int64))  # (B, T + 1), a fresh copy
    return windows[:, :-1], windows[:, 1:]  # (B, T) inputs, (B, T) targets


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    data: npt.NDArray[np.uint8],
    seq_len: int,
    batch_size: int,
    max_batches: int,
    device: torch.device | None = None,
) -> float:
    """Mean next-byte cross-entropy (nats) over fixed, non-overlapping windows of ``data``."""
    count = min((data.size - 1) // seq_len, batch_size * max_batches)
    if count < 1:
        raise ValueError(f"validation split of {data.size} bytes is shorter than seq_len + 1")
    index = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)  # (N, T + 1)
    windows = torch.from_numpy(data[index].astype(np.int64))
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, count, batch_size):
        batch = windows[start : start + batch_size].to(device or "cpu")
        _, loss = model(batch[:, :-1], batch[:, 1:])
        assert loss is not None
        total += float(loss) * len(batch)
    model.train(was_training)
    return total / count


def load_weights(model: torch.nn.Module, weights: Weights) -> None:
    """Copy ``weights`` (by parameter name; tied weights once) into ``model``."""
    missing = [name for name, _ in model.named_parameters() if name not in weights]
    if missing:
        raise KeyError(f"weights lack parameters {', '.join(missing[:5])}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(np.array(weights[name], copy=True)))


def model_weights(model: torch.nn.Module) -> Weights:
    """Float32 numpy copies of the parameters, by name (tied weights listed once)."""
    return {
        name: param.detach().to("cpu", torch.float32).numpy().copy()
        for name, param in model.named_parameters()
    }


@dataclass(frozen=True)
class FineTuneConfig:
    steps: int
    batch_size: int
    seq_len: int
    learning_rate: float
    seed: int
    proximal_mu: float = 0.0  # FedProx: weight of ||w - w_global||^2 / 2
    grad_clip: float = 1.0


@dataclass(frozen=True)
class FineTuneOutcome:
    mean_loss: float
    windows: int  # training windows seen: the example count FedAvg weighs by


def fine_tune(
    model: torch.nn.Module,
    text: npt.NDArray[np.uint8],
    config: FineTuneConfig,
    device: torch.device,
) -> FineTuneOutcome:
    """``config.steps`` AdamW steps on seeded random windows of ``text``."""
    if text.size <= config.seq_len + 1:
        raise ValueError(f"{text.size} bytes of text is shorter than seq_len + 2")
    model.to(device)
    model.train()
    global_params = [p.detach().clone() for p in model.parameters()]
    optimizer = AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    total = 0.0
    for _ in range(config.steps):
        inputs, targets = sample_batch(text, config.batch_size, config.seq_len, generator)
        optimizer.zero_grad()
        _, loss = model(inputs.to(device), targets.to(device))
        assert loss is not None
        total += float(loss.detach())
        if config.proximal_mu > 0:
            proximal = sum(
                ((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params, strict=True)
            )
            loss = loss + (config.proximal_mu / 2) * proximal
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
    model.to("cpu")
    return FineTuneOutcome(mean_loss=total / config.steps, windows=config.steps * config.batch_size)


def perplexity(loss_nats: float) -> float:
    """Per-byte perplexity from a mean cross-entropy in nats (inf when it overflows)."""
    return math.exp(loss_nats) if loss_nats < 700 else math.inf
