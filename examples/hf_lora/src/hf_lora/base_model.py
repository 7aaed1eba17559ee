"""The base model a job fine-tunes: where it is on this machine, its digest, its size,
and loading it with its own tokenizer.

A job names its base model by a directory (or an id already in this machine's Hugging
Face cache) and by a digest of that directory's files. Every site, and the coordinator,
checks that its own copy has that digest before it trains or scores anything, so all of
them fine-tune the same weights even though only the adapters travel. Nothing is ever
downloaded: the Hugging Face libraries run offline here.

A job's author chooses the directory, so a machine opens only directories below the
model roots its operator lists in HF_LORA_MODEL_ROOTS (paths separated by the OS path
separator; none: only ids in the Hugging Face cache). Without that, the coordinator
could make a site hash any tree its user reads (`/`, `/proc`: reading forever) and,
from which jobs fail, learn what exists there.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# Before any Hugging Face import: a job never reaches the network (sites may have none).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

WEIGHTS_GLOB = "*.safetensors"
ROOTS_ENV = "HF_LORA_MODEL_ROOTS"


class BaseModelError(ValueError):
    """The base model is missing here, differs from the job's, or cannot be read.

    A ValueError: at submit it is a bad `model_options` value, at a site a refused task."""


def model_roots() -> list[Path]:
    """The directories below which a job may name a base model directory here."""
    value = os.environ.get(ROOTS_ENV, "")
    return [Path(root).resolve() for root in value.split(os.pathsep) if root]


def resolve(reference: str, roots: Sequence[Path] | None = None) -> Path:
    """The directory holding `reference`: itself when it is a directory here (below one
    of `roots`; None: anywhere), else the snapshot of that id in this machine's Hugging
    Face cache."""
    path = Path(reference).expanduser()
    resolved = path.resolve()
    allowed = roots is None or any(resolved.is_relative_to(root) for root in roots)
    if path.is_absolute() or reference.startswith("."):
        if not allowed:
            raise BaseModelError(
                f"base model directory {reference} is not below a model root of this "
                f"machine ({ROOTS_ENV}: {os.pathsep.join(map(str, roots or [])) or 'none set'})"
            )
        if not resolved.is_dir():
            raise BaseModelError(f"base model directory {reference} does not exist on this machine")
        return resolved
    if allowed and resolved.is_dir():
        return resolved
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(reference, local_files_only=True))
    except Exception:  # the hub client raises several kinds for "not cached"
        raise BaseModelError(
            f"base model {reference!r} is neither a directory on this machine nor in its "
            "Hugging Face cache; put the model there first (nothing is downloaded during a job)"
        ) from None


def directory_digest(directory: Path) -> str:
    """sha256 over every file of the model directory (relative path and content, sorted;
    hidden files such as the hub's `.cache` left out): config, weights and tokenizer."""
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    if not files:
        raise BaseModelError(f"base model directory {directory} is empty")
    stamp = tuple(
        (str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns) for p in files
    )
    return _digest(directory, stamp)


@functools.cache
def _digest(directory: Path, stamp: tuple[tuple[str, int, int], ...]) -> str:
    # Cached by every file's size and mtime: a site checks the same copy once per process.
    hasher = hashlib.sha256()
    for relative, _, _ in stamp:
        file_hash = hashlib.sha256()
        with (directory / relative).open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                file_hash.update(chunk)
        hasher.update(relative.encode() + b"\0" + file_hash.digest())
    return hasher.hexdigest()


def check_digest(reference: str, expected: str) -> Path:
    """The model's directory, after checking it holds the files the job names."""
    directory = resolve(reference, model_roots())
    actual = directory_digest(directory)
    if actual != expected:
        raise BaseModelError(
            f"this machine's copy of base model {reference!r} ({directory}) has digest "
            f"{actual}, the job expects {expected}: every site needs the same model files"
        )
    return directory


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(WEIGHTS_GLOB))


def parameter_count(directory: Path) -> int:
    """The base model's parameters: from its safetensors headers when it has weights
    (nothing loaded), else by building it from config.json on the meta device."""
    files = weight_files(directory)
    if files:
        from safetensors import safe_open

        total = 0
        for path in files:
            with safe_open(str(path), framework="numpy") as stored:
                total += sum(math.prod(stored.get_slice(k).get_shape()) for k in stored.keys())  # noqa: SIM118 (a safetensors handle is not a dict)
        return total
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def load(directory: Path, init_seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model in float32 and its tokenizer; a directory without weights builds
    the model from its config.json with weights drawn from `init_seed`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # A site's log is not a terminal: no progress bars in it.
    transformers_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        if weight_files(directory):
            model = AutoModelForCausalLM.from_pretrained(
                directory, local_files_only=True, dtype=torch.float32
            )
        else:
            config = AutoConfig.from_pretrained(directory, local_files_only=True)
            with torch.random.fork_rng():
                torch.manual_seed(init_seed)
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise BaseModelError(f"cannot load the base model in {directory}: {err}") from None
    return model, tokenizer
