"""The model a job trains: the frozen base model wrapped by `peft` with LoRA adapters,
with the base model's tokenizer beside it. Only the adapters train and travel.

Imported by the workload's methods only (it imports torch, transformers and peft).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedTokenizerBase

from hf_lora.base_model import load


class LoRACausalLM(nn.Module):
    """A causal LM with LoRA adapters, its tokenizer, and what it was built from."""

    def __init__(
        self,
        adapted: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        base_parameters: int,
    ) -> None:
        super().__init__()
        self.adapted = adapted
        self.tokenizer = tokenizer
        self.base_parameters = base_parameters  # the full model's size, for byte counts

    def loss(self, blocks: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over `blocks` (batch, tokens)."""
        output = self.adapted(input_ids=blocks, labels=blocks)
        loss: torch.Tensor = output.loss
        return loss

    def adapters(self) -> OrderedDict[str, torch.Tensor]:
        """Every trainable tensor (the LoRA matrices), by name, detached."""
        return OrderedDict(
            (name, p.detach()) for name, p in self.adapted.named_parameters() if p.requires_grad
        )

    def load_adapters(self, tensors: Mapping[str, torch.Tensor]) -> None:
        own = dict((name, p) for name, p in self.adapted.named_parameters() if p.requires_grad)
        if set(tensors) != set(own):
            missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
            raise ValueError(
                f"the adapters do not fit this model: missing {missing[:3]}, unexpected "
                f"{extra[:3]} (is the job's lora_r or target_modules the same?)"
            )
        with torch.no_grad():
            for name, value in tensors.items():
                if value.shape != own[name].shape:
                    raise ValueError(
                        f"adapter {name} has shape {tuple(value.shape)}, this model's is "
                        f"{tuple(own[name].shape)}"
                    )
                own[name].copy_(value)


def build(
    directory: Path,
    init_seed: int,
    rank: int,
    alpha: int,
    target_modules: list[str],
    base_parameters: int,
) -> LoRACausalLM:
    base, tokenizer = load(directory, init_seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules,
        lora_dropout=0.0,  # deterministic given the seed
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft asks transformers about gradient checkpointing by a name v5 deprecates
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        try:
            adapted = get_peft_model(base, config)
        except ValueError as err:  # target modules the base model does not have
            raise ValueError(f"cannot put LoRA adapters on the base model: {err}") from None
    return LoRACausalLM(adapted, tokenizer, base_parameters)
