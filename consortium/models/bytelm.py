"""A byte-level, decoder-only transformer in the style of nanoGPT, in one file.

Vocabulary: the 256 byte values, so any text (or any file) is already tokenized.
Shapes in comments: ``B`` batch, ``T`` sequence length (<= ``block_size``), ``C``
embedding width (``n_embd``), ``nh`` heads, ``hs = C / nh`` head size, ``V = 256``.

Initialisation is deterministic and does not touch torch's global RNG: every parameter
is drawn, in sorted-name order, from one ``torch.Generator`` seeded with ``seed`` (the
GPT-2 scheme: N(0, 0.02), residual projections scaled by ``1 / sqrt(2 * n_layer)``,
biases zero, LayerNorm gains one). The input embedding and the output head share one
matrix (weight tying), so ``named_parameters()`` lists it once, as ``wte.weight``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional

from consortium.models.bytelm_config import FLOAT32_BYTES, INIT_STD, VOCAB_SIZE, ByteLMConfig

__all__ = [
    "FLOAT32_BYTES",
    "INIT_STD",
    "TINY",
    "VOCAB_SIZE",
    "ByteLM",
    "ByteLMConfig",
    "build_bytelm",
]

# A configuration small enough for unit and integration tests on a laptop CPU.
TINY = ByteLMConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ByteLMConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        q, k, v = self.c_attn(x).split(c, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, nh, T, hs): heads attend independently.
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        # Causal mask: position i sees positions <= i only. (B, nh, T, hs)
        y = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)  # re-assemble heads: (B, T, C)
        out: torch.Tensor = self.c_proj(y)  # (B, T, C)
        return out


class MLP(nn.Module):
    def __init__(self, config: ByteLMConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = functional.gelu(self.c_fc(x))  # (B, T, 4C)
        out: torch.Tensor = self.c_proj(h)  # (B, T, C)
        return out


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ByteLMConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        out: torch.Tensor = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return out


class ByteLM(nn.Module):
    def __init__(self, config: ByteLMConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        # torch's layers draw a default init from the global RNG; fork it so that building
        # a model leaves the caller's random stream alone (reset_parameters overwrites all).
        with torch.random.fork_rng(devices=[]):
            self.wte = nn.Embedding(VOCAB_SIZE, config.n_embd)  # byte -> vector
            self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position -> vector
            self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
            self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
            self.lm_head = nn.Linear(config.n_embd, VOCAB_SIZE, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one (V, C) matrix
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """GPT-2 initialisation from one seeded generator, in sorted-name order."""
        generator = torch.Generator().manual_seed(seed)
        residual_std = INIT_STD / math.sqrt(2 * self.config.n_layer)
        for name, param in sorted(self.named_parameters()):
            if name.endswith("bias"):
                param.zero_()
            elif ".ln_" in f".{name}":
                param.fill_(1.0)  # LayerNorm gain
            elif name.endswith("c_proj.weight"):
                param.normal_(0.0, residual_std, generator=generator)
            else:
                param.normal_(0.0, INIT_STD, generator=generator)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(B, T, V)`` for byte ids ``idx`` ``(B, T)``; the mean cross-entropy
        against ``targets`` ``(B, T)`` (the next bytes) when they are given."""
        _, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} bytes exceeds block_size {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C) + (T, C) -> (B, T, C)
        for block in self.h:
            x = block(x)  # (B, T, C)
        logits: torch.Tensor = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = functional.cross_entropy(logits.view(-1, VOCAB_SIZE), targets.reshape(-1))
        return logits, loss


def build_bytelm(config: ByteLMConfig = TINY, seed: int = 0) -> ByteLM:
    return ByteLM(config, seed)
