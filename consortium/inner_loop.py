"""The DiLoCo inner loop: a model replica with its own inner AdamW.

Shared by the places inner loops run: the Ray pool's actors
(`coordinator/pretraining/worker.py`), a site answering a federated pretraining
message (`client/federated/diloco_task.py`), and the coordinator's spot checks and
replays, which re-execute one to compare digests.

``run_inner(global_state, shard_ids, steps, seed)``: load the global weights, take
``steps`` AdamW steps on batches drawn (seeded) from the given shards, and return the
pseudo-gradient ``global - local``, encoded with the job's codec, plus metrics. The
corpus is built locally from this machine's own Python standard library and checked
against the job's digest, so no training data crosses the network.
"""

from __future__ import annotations

import math
import os
import platform
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from consortium.data.stdlib_corpus import StdlibCorpus, load_stdlib_corpus
from consortium.errors import DataDirError
from consortium.lm import Weights, load_weights, model_weights, sample_batch
from consortium.models.bytelm import ByteLM, ByteLMConfig
from consortium.optim import AdamW
from consortium.pseudo_gradient_codec import Codec, Encoded, encode


class CorpusShape(Protocol):
    """What names a job's corpus: a job spec or a `WorkerConfig`."""

    @property
    def num_shards(self) -> int: ...

    @property
    def corpus_bytes(self) -> int: ...

    @property
    def validation_bytes(self) -> int: ...


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs to know about the job (a picklable subset of the spec)."""

    model: ByteLMConfig
    inner_lr: float
    lr_schedule: Literal["constant", "cosine"]
    warmup_steps: int
    total_inner_steps: int  # per worker over the whole job: outer_steps * inner_steps
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float
    keep_optimizer_state: bool
    batch_size: int
    seq_len: int
    num_shards: int
    corpus_bytes: int
    validation_bytes: int
    corpus_digest: str
    deterministic: bool
    device: Literal["cpu", "gpu"]
    pseudo_gradient_codec: Codec = "fp32"


@dataclass(frozen=True)
class InnerMetrics:
    steps: int
    tokens: int
    mean_loss: float  # mean training loss over the inner steps
    last_loss: float
    compute_s: float  # wall-clock seconds of the inner loop on this worker's device
    device: Literal["cpu", "gpu"]


def inner_lr_at(config: WorkerConfig, step: int) -> float:
    """Learning rate of inner step ``step`` (counted over the whole job, from 0).

    Linear warmup over ``warmup_steps``, then constant or a cosine decay to
    ``min_lr_ratio * inner_lr`` at ``total_inner_steps`` (the nanoGPT schedule).
    """
    if step < config.warmup_steps:
        return config.inner_lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.inner_lr
    span = max(config.total_inner_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.min_lr_ratio * config.inner_lr
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.inner_lr - floor)


def corpus_for(config: CorpusShape) -> StdlibCorpus:
    """The job's corpus, built from this machine's standard library (cached per process)."""
    validation = config.validation_bytes
    return load_stdlib_corpus(config.num_shards, config.corpus_bytes, validation)


def enable_determinism(device: Literal["cpu", "gpu"]) -> None:
    """Bit-reproducible kernels: one CPU thread, deterministic algorithms (and cuBLAS)."""
    if device == "gpu":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
    torch.set_num_threads(1)
    set_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def set_deterministic_algorithms(enabled: bool) -> None:
    """`torch.use_deterministic_algorithms(enabled)` for eager code only.

    The public switch also sets the flag for code that torch compiles, and importing
    that config imports torch._inductor and torch._dynamo: about 1.5 to 2 CPU-s the
    first time, in every trainer, spot check and replay, and at a site on its first
    federated pretraining step (restoring the flag after it). Nothing here is compiled,
    so only the eager flag is set (`torch.are_deterministic_algorithms_enabled()` reads
    it back)."""
    set_eager_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_eager_flag is not None:
        set_eager_flag(enabled, warn_only=False)
    else:  # a torch without it: the public switch, at its import cost
        torch.use_deterministic_algorithms(enabled)


class InnerTrainer:
    def __init__(self, config: WorkerConfig, torch_device: str | None = None) -> None:
        """``torch_device``: the exact device (a site's ``cuda:1``); by default the
        config's kind (a Ray actor sees only the GPU it was given, as ``cuda``)."""
        self.config = config
        if config.deterministic:
            enable_determinism(config.device)
        default = "cuda" if config.device == "gpu" else "cpu"
        self.device = torch.device(torch_device or default)
        corpus = corpus_for(config)
        if corpus.digest != config.corpus_digest:
            raise DataDirError(
                f"this node's corpus digest {corpus.digest[:16]} differs from the job's "
                f"{config.corpus_digest[:16]}: its Python standard library "
                f"({platform.python_version()}) is not the coordinator's; run the worker "
                "on the same Python version"
            )
        self.shards = corpus.shards
        self.model = ByteLM(config.model).to(self.device)
        self.optimizer = self._new_optimizer()
        self.inner_steps_done = 0

    def _new_optimizer(self) -> AdamW:
        return AdamW(
            self.model.parameters(),
            lr=self.config.inner_lr,
            weight_decay=self.config.weight_decay,
            betas=(0.9, 0.95),
        )

    def ready(self) -> dict[str, Any]:
        """Called once after placement; tells the controller where the worker runs."""
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.device),
            "python": platform.python_version(),
        }

    def run_inner(
        self,
        global_state: Weights,
        shard_ids: tuple[int, ...],
        steps: int,
        seed: int,
        first_step: int = 0,
    ) -> tuple[Encoded, InnerMetrics]:
        """``steps`` AdamW steps from ``global_state``; returns ``global - local``, encoded
        with the job's pseudo-gradient codec (what is sent), and metrics.

        ``first_step`` is the job-wide index of the first inner step (outer step * H); it
        only positions the learning-rate schedule.
        """
        config = self.config
        load_weights(self.model, global_state)
        if not config.keep_optimizer_state:
            self.optimizer = self._new_optimizer()
        data = np.concatenate([self.shards[i] for i in shard_ids])
        generator = torch.Generator().manual_seed(seed)
        self.model.train()
        started = time.perf_counter()
        losses = torch.zeros(steps, dtype=torch.float64)
        for step in range(steps):
            self.optimizer.lr = inner_lr_at(config, first_step + step)
            x, y = sample_batch(data, config.batch_size, config.seq_len, generator)
            _, loss = self.model(x.to(self.device), y.to(self.device))
            assert loss is not None
            self.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            self.optimizer.step()
            losses[step] = loss.detach().to("cpu", torch.float64)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        compute_s = time.perf_counter() - started
        self.inner_steps_done += steps
        local = model_weights(self.model)
        pseudo_gradient = {name: np.subtract(global_state[name], local[name]) for name in local}
        metrics = InnerMetrics(
            steps=steps,
            tokens=steps * config.batch_size * config.seq_len,
            mean_loss=float(losses.mean()),
            last_loss=float(losses[-1]),
            compute_s=compute_s,
            device=config.device,
        )
        return encode(pseudo_gradient, config.pseudo_gradient_codec), metrics
