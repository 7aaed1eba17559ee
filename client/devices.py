"""Choosing the training device: `--gpu N` means that GPU or a clear error.

torch is imported only where a GPU is asked about: a site training on the CPU starts
`client join` without it (about 1.4 s of CPU per start), and imports it once a task
trains."""

from __future__ import annotations

import os
import re

from consortium.errors import GpuUnavailableError


def resolve_device(gpu: int | None) -> str:
    """'cpu', or 'cuda:N' after checking GPU N exists; never a silent CPU fallback."""
    if gpu is None:
        return "cpu"
    import torch

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
        import torch

        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def label_value(text: str) -> str:
    """`text` as a Ray label value: alphanumerics with -_. inside, at most 63 characters."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")
    return cleaned[:63].rstrip("-_.") or "unknown"


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.0f}GiB"


def hardware_labels(device: str) -> dict[str, str]:
    """Ray node labels describing this node: host memory and, on a GPU, its model and
    memory (so operators and schedulers can tell contributed nodes apart)."""
    labels = {"memory": _gib(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))}
    if device.startswith("cuda"):
        import torch

        properties = torch.cuda.get_device_properties(torch.device(device))
        labels["gpu-model"] = label_value(properties.name)
        labels["gpu-memory"] = _gib(properties.total_memory)
    return labels
