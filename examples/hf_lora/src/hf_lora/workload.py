"""`hf-lora`: LoRA fine-tuning of a Hugging Face causal LM (docs/workloads.md).

A job names the base model and its digest in `model_options`:

    model_options = { base_model = "/models/tiny-llama", base_model_digest = "<sha256>",
                      lora_r = 8, lora_alpha = 16, target_modules = "q_proj,v_proj" }

Every site (and the coordinator, which scores each round on public held-out text)
loads its own copy of the base model, checks its digest, and puts the same adapters on
it. Only the adapters travel and are aggregated; the base model's weights stay in
memory at the site between rounds (`keep_model_loaded`). A site's data is any text
dataset in its data dir (`.txt`, or `.jsonl` / `.parquet` rows with a `text` field),
read with `datasets` and cut into blocks by the model's own tokenizer.

torch, transformers and peft are imported inside the methods: the coordinator loads
workloads to check specs in processes that never train.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from consortium.workloads import EvalResult, HeldOut, RoundBudget, TrainResult, WorkloadOptions
from hf_lora import base_model

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hf_lora.lora_model import LoRACausalLM
    from hf_lora.text_data import SiteText

EVAL_BATCH_SIZE = 16
SITE_EVAL_BATCHES = 8
DIGEST = re.compile(r"[0-9a-f]{64}")
MAX_RANK = 1024


@dataclass(frozen=True)
class LoRAOptions:
    """A job's `model_options` for this workload."""

    base_model: str  # a directory, or an id in the machine's Hugging Face cache
    base_model_digest: str  # sha256 of its files: `python -m hf_lora.digest DIR` prints it
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: str = "q_proj,v_proj"  # comma-separated module names
    init_seed: int = 0  # weights of a base model given by its config alone

    @classmethod
    def parse(cls, options: WorkloadOptions) -> LoRAOptions:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(
                f"hf-lora takes no option {', '.join(unknown)}; it takes {', '.join(known)}"
            )
        for required in ("base_model", "base_model_digest"):
            if required not in options:
                raise ValueError(
                    f"hf-lora needs model_options.{required} (the base model's directory and "
                    "the digest of its files: `python -m hf_lora.digest DIR` prints it)"
                )
        for name, value in options.items():
            wanted = str if known[name].type == "str" else int
            if not isinstance(value, wanted) or isinstance(value, bool):
                raise ValueError(
                    f"hf-lora option {name} must be a {wanted.__name__}, got {value!r}"
                )
        parsed = cls(**options)  # type: ignore[arg-type]  # each value's type is checked above
        if not DIGEST.fullmatch(parsed.base_model_digest):
            raise ValueError("hf-lora option base_model_digest must be 64 lowercase hex digits")
        if not 1 <= parsed.lora_r <= MAX_RANK or parsed.lora_alpha < 1:
            raise ValueError(f"hf-lora needs 1 <= lora_r <= {MAX_RANK} and lora_alpha >= 1")
        if not parsed.modules():
            raise ValueError("hf-lora option target_modules names no module")
        return parsed

    def modules(self) -> list[str]:
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]

    def directory(self) -> Path:
        """This machine's copy of the base model, checked against the job's digest."""
        return base_model.check_digest(self.base_model, self.base_model_digest)


class HuggingFaceLoRA:
    datasets: frozenset[str] = frozenset()  # any text dataset a site holds
    # Only the adapters change in training, and they all travel: the frozen base
    # model is built once per job at a site and stays loaded.
    keep_model_loaded = True

    def parameter_count(self, options: WorkloadOptions) -> int:
        return base_model.parameter_count(LoRAOptions.parse(options).directory())

    def build_model(self, options: WorkloadOptions) -> nn.Module:
        from hf_lora.lora_model import build

        parsed = LoRAOptions.parse(options)
        directory = parsed.directory()
        return build(
            directory,
            parsed.init_seed,
            parsed.lora_r,
            parsed.lora_alpha,
            parsed.modules(),
            base_model.parameter_count(directory),
        )

    def exchanged(self, model: nn.Module) -> OrderedDict[str, torch.Tensor]:
        return _lora(model).adapters()

    def load_exchanged(self, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        _lora(model).load_adapters(tensors)

    def load_site_data(self, data_dir: Path, dataset: str) -> SiteText:
        from hf_lora.text_data import load_site_text

        return load_site_text(data_dir, dataset)

    def train(
        self,
        model: nn.Module,
        data: SiteText,
        budget: RoundBudget,
        device: torch.device,
        commitment_key: bytes,
    ) -> TrainResult:
        import torch

        from consortium.provenance.commitment import commit_records

        lm = _lora(model).to(device)
        blocks = data.blocks(lm.tokenizer, budget.seq_len)
        trainable = [p for p in lm.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in trainable]
        optimizer = torch.optim.AdamW(trainable, lr=budget.learning_rate, weight_decay=0.0)
        generator = torch.Generator().manual_seed(budget.seed)
        batch = min(budget.batch_size, len(blocks))
        seen: set[int] = set()
        losses = []
        lm.train()
        for _ in range(budget.steps):
            index = torch.randint(len(blocks), (batch,), generator=generator)
            seen.update(index.tolist())
            loss = lm.loss(blocks[index].to(device))
            losses.append(float(loss.detach()))
            if budget.proximal_mu > 0:  # FedProx: stay near the round's global adapters
                drift = sum(((p - s) ** 2).sum() for p, s in zip(trainable, start, strict=True))
                loss = loss + budget.proximal_mu / 2 * drift
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        lm.eval()
        commitment = commit_records(
            data.name, data.records(), {"text": "rows", "format": data.builder}, commitment_key
        )
        return TrainResult(len(seen), sum(losses) / max(len(losses), 1), commitment)

    def evaluate(
        self, model: nn.Module, data: SiteText, budget: RoundBudget, device: torch.device
    ) -> EvalResult:
        lm = _lora(model).to(device)
        blocks = data.blocks(lm.tokenizer, budget.seq_len)
        loss, count = mean_loss(lm, blocks, SITE_EVAL_BATCHES, device)
        return EvalResult(count, perplexity_metrics(loss))

    def held_out(self, dataset: str, budget: RoundBudget, eval_batches: int) -> HeldOut:
        return PublicText(budget.seq_len, eval_batches)


class PublicText:
    """The coordinator's held-out text: the held-out docstrings of consortium's own
    dependencies (public, and disjoint from what the demo's sites hold)."""

    def __init__(self, seq_len: int, eval_batches: int) -> None:
        from consortium.data.docstrings import DEFAULT_BYTES_PER_PACKAGE, held_out_text
        from hf_lora.text_data import SiteText

        text = held_out_text(DEFAULT_BYTES_PER_PACKAGE).tobytes().decode("utf-8", "replace")
        rows = [chunk for chunk in text.split("\n\n") if chunk.strip()]
        self.text = SiteText("held-out", "text", rows)  # tokenized once, on first use
        self.seq_len = seq_len
        self.eval_batches = eval_batches

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        import torch

        lm = _lora(model)
        blocks = self.text.blocks(lm.tokenizer, self.seq_len)
        loss, _ = mean_loss(lm, blocks, self.eval_batches, torch.device("cpu"))
        return perplexity_metrics(loss)


def mean_loss(
    lm: LoRACausalLM, blocks: torch.Tensor, max_batches: int, device: torch.device
) -> tuple[float, int]:
    """Mean token loss over the first `max_batches` batches of blocks, and the blocks."""
    import torch

    count = min(len(blocks), max_batches * EVAL_BATCH_SIZE)
    total = 0.0
    lm.eval()
    with torch.no_grad():
        for start in range(0, count, EVAL_BATCH_SIZE):
            chunk = blocks[start : min(start + EVAL_BATCH_SIZE, count)]
            total += float(lm.loss(chunk.to(device))) * len(chunk)
    return total / count, count


def perplexity_metrics(loss: float) -> dict[str, float]:
    import math

    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def _lora(model: nn.Module) -> LoRACausalLM:
    from hf_lora.lora_model import LoRACausalLM

    if not isinstance(model, LoRACausalLM):
        raise ValueError(f"hf-lora was handed a {type(model).__name__}, not its own model")
    return model
