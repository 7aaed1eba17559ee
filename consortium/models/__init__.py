"""Built-in models, by the name a job spec uses."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from consortium.models.digits_cnn import DigitsCNN

MODELS: dict[str, Callable[[], nn.Module]] = {
    "digits-cnn": DigitsCNN,
}

__all__ = ["MODELS", "DigitsCNN", "build_model"]


def build_model(name: str) -> nn.Module:
    try:
        factory = MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise KeyError(f"unknown model {name!r}; known models: {known}") from None
    return factory()
