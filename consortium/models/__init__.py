"""Built-in models, by the name a job spec uses, and their weights by parameter name."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
from torch import nn

from consortium.models.bytelm import ByteLM, ByteLMConfig
from consortium.models.digits_cnn import DigitsCNN

ModelOptions = Mapping[str, int]


def _digits_cnn(options: ModelOptions) -> nn.Module:
    if options:
        raise ValueError(f"model 'digits-cnn' takes no options, got {sorted(options)}")
    return DigitsCNN()


BYTELM_OPTIONS = ("n_layer", "n_head", "n_embd", "block_size")


def _bytelm(options: ModelOptions) -> nn.Module:
    unknown = sorted(set(options) - set(BYTELM_OPTIONS))
    if unknown:
        raise ValueError(f"unknown bytelm options {unknown}; known: {', '.join(BYTELM_OPTIONS)}")
    default = ByteLMConfig()
    return ByteLM(
        ByteLMConfig(**{name: options.get(name, getattr(default, name)) for name in BYTELM_OPTIONS})
    )


MODELS: dict[str, Callable[[ModelOptions], nn.Module]] = {
    "digits-cnn": _digits_cnn,
    "bytelm": _bytelm,  # options: n_layer, n_head, n_embd, block_size
}

__all__ = ["MODELS", "DigitsCNN", "build_model", "load_parameter_tensors", "parameter_tensors"]


def build_model(name: str, options: ModelOptions | None = None) -> nn.Module:
    """The model ``name`` with ``options`` (raises ValueError for bad options)."""
    try:
        factory = MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise KeyError(f"unknown model {name!r}; known models: {known}") from None
    try:
        return factory(options or {})
    except TypeError as err:  # an option the model does not have
        raise ValueError(f"bad options for model {name!r}: {err}") from None


def parameter_tensors(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Detached parameters by name; tied weights (ByteLM's embedding and output head)
    appear once, so the dict can be sent, aggregated and saved as safetensors."""
    return OrderedDict((name, p.detach()) for name, p in model.named_parameters())


def load_parameter_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into ``model``'s parameters; every parameter must be present
    with its shape, and no unknown name may appear."""
    own = dict(model.named_parameters())
    missing = sorted(set(own) - set(tensors))
    unknown = sorted(set(tensors) - set(own))
    if missing or unknown:
        raise ValueError(f"weights do not fit the model: missing {missing}, unknown {unknown}")
    with torch.no_grad():
        for name, param in own.items():
            value = tensors[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"weights do not fit the model: {name} has shape {tuple(value.shape)}, "
                    f"the model {tuple(param.shape)}"
                )
            param.copy_(value.to(param.dtype))
