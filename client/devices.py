"""Choosing the training device: `--gpu N` means that GPU or a clear error."""

from __future__ import annotations

import torch

from consortium.errors import GpuUnavailableError


def resolve_device(gpu: int | None) -> str:
    """'cpu', or 'cuda:N' after checking GPU N exists; never a silent CPU fallback."""
    if gpu is None:
        return "cpu"
    if not torch.cuda.is_available():
        raise GpuUnavailableError(
            f"--gpu {gpu} asked for a GPU, but no CUDA GPU is visible on this machine "
            f"(torch {torch.__version__}); drop --gpu to train on the CPU"
        )
    count = torch.cuda.device_count()
    if gpu >= count:
        raise GpuUnavailableError(
            f"--gpu {gpu} does not exist: this machine has {count} GPU(s), numbered 0..{count - 1}"
        )
    return f"cuda:{gpu}"


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device
