"""Benchmark: a site's seconds per round for the Hugging Face LoRA example, with the
persistent trainer and without it; and the bytes that travel per round.

    python benchmarks/hf_lora_trainer.py [--rounds 5] [--local-steps 20] [--seq-len 64]

The same base model (the example's tiny Llama-style model, built here), site text (the
docstrings of two packages), LoRA options and round budget, one site's rounds measured
side by side in one run:

- **persistent trainer** (what `client join` does): the model, tokenizer and tokenized
  data stay loaded between messages; a round copies the received adapters in, trains
  and reads the adapters out;
- **model rebuilt every round** (`client join` with a `trainer_memory_mb` below the
  model's size): the same process and data, but the base model, tokenizer and
  adapters are built again for every message;
- **reloaded every round** (what Flower's default per-message `flwr-clientapp` process
  pays): a fresh Python process per round imports torch, transformers and peft, loads
  the base model and tokenizer, reads and tokenizes the site's data, then does the same
  round (adapters in and out through a safetensors file).

Prints the mean seconds per round of each (rounds 2..N: the persistent trainer's first
round also loads everything), their ratio, and the adapters' bytes against the full
model's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hf_lora.base_model import ROOTS_ENV
from hf_lora.make_tiny import make_tiny_model
from hf_lora.workload import HuggingFaceLoRA
from safetensors.torch import load_file, save_file

from consortium.data.docstrings import DEFAULT_BYTES_PER_PACKAGE, site_text
from consortium.workloads import RoundBudget

SITE_PACKAGES = ("numpy", "rich")
KEY = b"benchmark-commitment-key-32bytes"

# One round in a fresh process, as a per-message ClientApp process would run it.
ONE_ROUND = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from consortium.workloads import RoundBudget
from hf_lora.workload import HuggingFaceLoRA
spec = json.loads(sys.argv[1])
torch.set_num_threads(1)
workload = HuggingFaceLoRA()
model = workload.build_model(spec["options"])
data = workload.load_site_data(Path(spec["data_dir"]), "docstrings")
workload.load_exchanged(model, load_file(spec["adapters"]))
workload.train(model, data, RoundBudget(**spec["budget"]), torch.device("cpu"), b"k" * 32)
save_file(dict(workload.exchanged(model)), spec["adapters"])
"""


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def persistent(
    options: dict[str, str],
    data_dir: Path,
    budgets: list[RoundBudget],
    adapters: Path,
    keep_model: bool = True,
) -> list[float]:
    """Seconds of each round in this process: the data kept, and the model too unless
    `keep_model` is false (the first round loads everything)."""
    torch.set_num_threads(1)
    workload = HuggingFaceLoRA()
    model = data = None
    times = []
    for budget in budgets:
        started = time.perf_counter()
        if data is None:
            data = workload.load_site_data(data_dir, "docstrings")
        if model is None or not keep_model:
            model = workload.build_model(options)
        workload.load_exchanged(model, load_file(adapters))
        workload.train(model, data, budget, torch.device("cpu"), KEY)
        save_file(dict(workload.exchanged(model)), adapters)
        times.append(time.perf_counter() - started)
    return times


def reloaded(
    options: dict[str, str], data_dir: Path, budgets: list[RoundBudget], adapters: Path
) -> list[float]:
    """Seconds of each round in a fresh process."""
    times = []
    for budget in budgets:
        spec = {
            "options": options,
            "data_dir": str(data_dir),
            "adapters": str(adapters),
            "budget": budget.__dict__,
        }
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", ONE_ROUND, json.dumps(spec)], check=True)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is left out of the means)")
    with tempfile.TemporaryDirectory(prefix="hf-lora-bench-") as tmp:
        work = Path(tmp)
        digest = make_tiny_model(work / "model")
        os.environ[ROOTS_ENV] = str(work)  # this machine's model root
        options = {"base_model": str(work / "model"), "base_model_digest": digest}
        data_dir = work / "site"
        (data_dir / "text").mkdir(parents=True)
        text = site_text(SITE_PACKAGES, DEFAULT_BYTES_PER_PACKAGE)
        (data_dir / "text" / "docstrings.txt").write_bytes(text)
        budgets = [
            RoundBudget(1, args.local_steps, 8, 0.01, seed=round_, seq_len=args.seq_len)
            for round_ in range(args.rounds)
        ]
        workload = HuggingFaceLoRA()
        torch.manual_seed(0)
        model = workload.build_model(options)
        start = dict(workload.exchanged(model))
        adapter_bytes = sum(t.numel() * t.element_size() for t in start.values())
        full_bytes = workload.parameter_count(options) * 4
        results = {}
        runs = (
            ("persistent trainer", persistent),
            ("model rebuilt every round", functools.partial(persistent, keep_model=False)),
            ("reloaded every round", reloaded),
        )
        for name, run in runs:
            adapters = work / f"{name.split()[0]}.safetensors"
            save_file(start, adapters)
            print(f"{name}: {args.rounds} rounds of {args.local_steps} steps...", flush=True)
            results[name] = run(options, data_dir, budgets, adapters)
        # Both ran the same rounds from the same adapters: they must end equal.
        ends = [load_file(work / f"{name.split()[0]}.safetensors") for name, _ in runs]
        same = all(torch.equal(end[key], ends[0][key]) for end in ends[1:] for key in ends[0])
    print()
    print(f"{'site, one round':<28}{'first s':>10}{'rounds 2..N s':>16}{'/ persistent':>14}")
    kept = mean(results["persistent trainer"][1:])
    for name, times in results.items():
        rest = mean(times[1:])
        print(f"{name:<28}{times[0]:>10.2f}{rest:>16.2f}{rest / kept:>13.1f}x")
    print(f"same adapters after the last round in every run: {same}")
    print(
        f"bytes per site and round: adapters {adapter_bytes:,}, full model {full_bytes:,} "
        f"({100 * adapter_bytes / full_bytes:.1f}%)"
    )


if __name__ == "__main__":
    main()
