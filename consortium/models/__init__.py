"""Built-in models, by the name a job spec uses, and their weights by parameter name.

Importing this package does not import torch: the size checks a job spec goes through
at submit run in processes (the CLI, the coordinator's scheduler) that never build a
model. Building one, or moving its weights, imports torch on first use.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from consortium.models.bytelm_config import ByteLMConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

ModelOptions = Mapping[str, int | float | str | bool]


def _no_options(name: str, options: ModelOptions) -> None:
    if options:
        raise ValueError(f"model {name!r} takes no options, got {sorted(options)}")


def _digits_cnn(options: ModelOptions) -> nn.Module:
    from consortium.models.digits_cnn import DigitsCNN

    _no_options("digits-cnn", options)
    return DigitsCNN()


BYTELM_OPTIONS = ("n_layer", "n_head", "n_embd", "block_size")


def _bytelm_config(options: ModelOptions) -> ByteLMConfig:
    unknown = sorted(set(options) - set(BYTELM_OPTIONS))
    if unknown:
        raise ValueError(f"unknown bytelm options {unknown}; known: {', '.join(BYTELM_OPTIONS)}")
    for name, value in options.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"bytelm option {name} must be an integer, got {value!r}")
    default = ByteLMConfig()
    return ByteLMConfig(
        **{name: options.get(name, getattr(default, name)) for name in BYTELM_OPTIONS}
    )


def _bytelm(options: ModelOptions) -> nn.Module:
    from consortium.models.bytelm import ByteLM

    return ByteLM(_bytelm_config(options))


def _digits_cnn_parameters(options: ModelOptions) -> int:
    _no_options("digits-cnn", options)
    return DIGITS_CNN_PARAMETERS


# Conv 1->16 and 16->32 (3x3, with biases), Linear 512->64 and 64->10.
DIGITS_CNN_PARAMETERS = (16 * 9 + 16) + (32 * 16 * 9 + 32) + (512 * 64 + 64) + (64 * 10 + 10)


MODELS: dict[str, Callable[[ModelOptions], nn.Module]] = {
    "digits-cnn": _digits_cnn,
    "bytelm": _bytelm,  # options: n_layer, n_head, n_embd, block_size
}

# How many parameters each model would have, computed without allocating anything: a
# job spec is checked against `MAX_PARAMETERS` before any model is built.
PARAMETER_COUNTS: dict[str, Callable[[ModelOptions], int]] = {
    "digits-cnn": _digits_cnn_parameters,
    "bytelm": lambda options: _bytelm_config(options).num_parameters(),
}

# The largest model a job may ask for: 1e9 float32 parameters are 4 GB per copy, and a
# site holds several copies (weights, gradients, optimizer moments, the update).
MAX_PARAMETERS = 1_000_000_000
# The most a training step may take in: batch_size x seq_len (windows x bytes, or
# tokens). The model's size is one lever of a step's memory, this is the other: a job
# of batch_size 65,536 at seq_len 128 needed about 300 GiB of activations for the
# default ByteLM (measured: 4.6 MiB per 128-byte window, 36 KiB a token) and the OOM
# killer took `client join`. At the cap that model's step takes about 2.3 GiB. Image
# workloads do not use seq_len: their batch_size is capped at this over its default.
MAX_STEP_TOKENS = 65_536

__all__ = [
    "MAX_PARAMETERS",
    "MAX_STEP_TOKENS",
    "MODELS",
    "PARAMETER_COUNTS",
    "build_model",
    "check_model_size",
    "load_parameter_tensors",
    "parameter_tensors",
    "step_tokens_problem",
]


def step_tokens_problem(batch_size: int, seq_len: int) -> str | None:
    """Why a step of `batch_size` windows of `seq_len` is too large, or None."""
    if batch_size < 1 or seq_len < 1:  # a product of 0 or below would pass any batch
        return f"batch_size and seq_len must be at least 1, not {batch_size} and {seq_len}"
    if batch_size * seq_len <= MAX_STEP_TOKENS:
        return None
    return (
        f"batch_size x seq_len is {batch_size:,} x {seq_len:,} = {batch_size * seq_len:,}; "
        f"a training step takes at most {MAX_STEP_TOKENS:,}"
    )


def check_model_size(name: str, options: ModelOptions, limit: int = MAX_PARAMETERS) -> int:
    """The parameter count of ``name`` with ``options``, computed without building it;
    raises ValueError for bad options or a model larger than ``limit``."""
    try:
        count = PARAMETER_COUNTS[name](options)
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None
    except TypeError as err:
        raise ValueError(f"bad options for model {name!r}: {err}") from None
    if count > limit:
        raise ValueError(
            f"the model would have {count:,} parameters; the limit is {limit:,} "
            "(shrink n_layer, n_embd or block_size)"
        )
    return count


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
    import torch

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
