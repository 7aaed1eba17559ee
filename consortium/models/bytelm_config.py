"""ByteLM's shape: its configuration and exact size, without importing torch.

A job spec is checked against the size limit at submit, in processes (the CLI, the
coordinator's scheduler) that never build a model and should not pay for importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

VOCAB_SIZE = 256  # one token per byte value
INIT_STD = 0.02
FLOAT32_BYTES = 4


@dataclass(frozen=True)
class ByteLMConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128  # longest context the position embedding covers
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2

    def __post_init__(self) -> None:
        for field in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")

    def num_parameters(self) -> int:
        """Exact parameter count, computed without building the model."""
        c, b = self.n_embd, int(self.bias)
        per_layer = (
            2 * (c + b * c)  # ln_1, ln_2
            + (c * 3 * c + b * 3 * c)  # attn.c_attn
            + (c * c + b * c)  # attn.c_proj
            + (c * 4 * c + b * 4 * c)  # mlp.c_fc
            + (4 * c * c + b * c)  # mlp.c_proj
        )
        embeddings = VOCAB_SIZE * c + self.block_size * c  # wte (tied with lm_head), wpe
        return embeddings + self.n_layer * per_layer + (c + b * c)  # + ln_f

    def parameter_bytes(self) -> int:
        """Bytes of the float32 weights (also the size of one pseudo-gradient)."""
        return FLOAT32_BYTES * self.num_parameters()
