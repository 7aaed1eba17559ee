"""AdamW and momentum SGD for the project's own training loops, stepped by torch's
functional kernels (``torch.optim.adamw.adamw``, ``torch.optim.sgd.sgd``): the same
arithmetic as ``torch.optim.AdamW`` and ``torch.optim.SGD``, bit for bit
(tests/unit/test_optim.py compares them step by step).

Why not torch's optimizer classes: their ``add_param_group``, ``zero_grad`` and ``step``
run through ``torch._disable_dynamo`` or ``_use_grad_for_differentiable``, which import
``torch._dynamo`` (and with it sympy) the first time a process calls them, and there is
no switch. That is about 2 CPU-s in every process that trains, and a consortium starts
many short ones: a site's inner loop for each federated run, every Ray trainer, the
ServerApp or driver applying outer steps, every replay and spot check. The functional
kernels reach dynamo only while compiling.

One parameter group, as every loop here uses; a workload package is free to use
``torch.optim`` itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps Adam's step count in float64 where that is the default dtype.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class _OneGroup:
    """The parameters an optimizer steps: one group, as every loop here uses."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.params = list(params)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None


class AdamW(_OneGroup):
    """``torch.optim.AdamW(params, lr, betas, eps, weight_decay)`` with its defaults
    otherwise (no amsgrad, not fused; foreach as torch picks it for the device).
    ``state`` maps a parameter's index to its ``step``, ``exp_avg`` and ``exp_avg_sq``,
    as torch's keeps them per parameter."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params)
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for index, param in enumerate(self.params):
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            state = self.state.get(index)
            if state is None:
                state = self.state[index] = {
                    "step": torch.tensor(0.0, dtype=_scalar_dtype()),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }
            params.append(param)
            grads.append(param.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = self.betas
        adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            has_complex=any(torch.is_complex(p) for p in params),
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=self.lr,
            weight_decay=self.weight_decay,
            eps=self.eps,
            maximize=False,
        )


class SGD(_OneGroup):
    """``torch.optim.SGD(params, lr, momentum, nesterov)`` with no weight decay or
    dampening. ``state_dict`` and ``load_state_dict`` use torch's layout (``state`` by
    parameter index, each with its ``momentum_buffer``; one entry in ``param_groups``),
    so a checkpoint written with ``torch.optim.SGD`` still loads."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs a momentum above zero")
        super().__init__(params)
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.momentum_buffers: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        indices = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in indices]
        grads: list[torch.Tensor] = []
        for param in params:
            assert param.grad is not None
            grads.append(param.grad)
        buffers: list[torch.Tensor | None] = [self.momentum_buffers.get(i) for i in indices]
        sgd(
            params,
            grads,
            buffers,
            has_sparse_grad=any(g.is_sparse for g in grads),
            weight_decay=0.0,
            momentum=self.momentum,
            lr=self.lr,
            dampening=0.0,
            nesterov=self.nesterov,
            maximize=False,
        )
        if self.momentum != 0:
            # sgd() fills the list in place where a parameter had no buffer yet.
            for index, buffer in zip(indices, buffers, strict=True):
                assert buffer is not None
                self.momentum_buffers[index] = buffer

    def state_dict(self) -> dict[str, Any]:
        return {
            "state": {i: {"momentum_buffer": b} for i, b in self.momentum_buffers.items()},
            "param_groups": [
                {
                    "lr": self.lr,
                    "momentum": self.momentum,
                    "dampening": 0.0,
                    "weight_decay": 0.0,
                    "nesterov": self.nesterov,
                    "maximize": False,
                    "params": list(range(len(self.params))),
                }
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        (group,) = state_dict["param_groups"]
        if len(group["params"]) != len(self.params):
            raise ValueError(
                f"the optimizer state holds {len(group['params'])} parameters, "
                f"the model {len(self.params)}"
            )
        self.lr = float(group["lr"])
        self.momentum = float(group["momentum"])
        self.nesterov = bool(group["nesterov"])
        buffers = {}
        for index, entry in state_dict["state"].items():
            buffer = entry["momentum_buffer"]
            if buffer is not None:
                param = self.params[int(index)]
                # A copy: stepping must not change the caller's tensors.
                buffers[int(index)] = buffer.to(param.device, param.dtype, copy=True)
        self.momentum_buffers = buffers
