"""A tiny Llama-style causal LM with random weights and its own tokenizer, built on this
machine (nothing downloaded): the base model of the example and its tests.

    python -m hf_lora.make_tiny DIR [--config-only]

The tokenizer is a byte-level BPE trained on the docstrings of a few standard-library
packages (public text every Python has); the model has seeded random weights, saved as
safetensors beside its config. `--config-only` leaves the weights out: the workload
then builds the model from config.json with weights drawn from the job's `init_seed`.
Prints the directory's digest, the value a job spec's `base_model_digest` takes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from hf_lora.base_model import directory_digest

# Public text for the tokenizer: standard-library packages, not the sites' text.
TOKENIZER_PACKAGES = ("asyncio", "email", "json", "logging", "unittest", "http")
TOKENIZER_BYTES_PER_PACKAGE = 48 * 1024
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TinyLlama:
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 256
    seed: int = 0


def tokenizer_corpus() -> list[str]:
    from consortium.data.docstrings import package_text

    texts = []
    for package in TOKENIZER_PACKAGES:
        text = package_text(package, TOKENIZER_BYTES_PER_PACKAGE)
        texts.append((text.train + text.held_out).decode("utf-8", errors="replace"))
    return [chunk for text in texts for chunk in text.split("\n\n") if chunk.strip()]


def make_tiny_model(directory: Path, shape: TinyLlama = TinyLlama(), weights: bool = True) -> str:
    """Write the model (config, weights unless `weights` is false) and tokenizer into
    `directory`; returns the directory's digest."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    directory.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        tokenizer_corpus(),
        trainers.BpeTrainer(
            vocab_size=shape.vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=EOS
    )
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    if weights:
        with torch.random.fork_rng():
            torch.manual_seed(shape.seed)
            model = LlamaForCausalLM(config)
        model.save_pretrained(directory)
    else:
        config.save_pretrained(directory)
    return directory_digest(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--config-only", action="store_true", help="leave the weights out")
    args = parser.parse_args()
    digest = make_tiny_model(args.directory, weights=not args.config_only)
    print(f"{args.directory}: base_model_digest = {digest!r}")


if __name__ == "__main__":
    main()
