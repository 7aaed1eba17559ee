"""The DiLoCo worker of the Ray pool: `consortium.inner_loop.InnerTrainer` as a Ray actor.

The controller places one per contributed GPU (``num_gpus=1``) or, on nodes without
GPUs, one per CPU slot (``num_cpus=1``), pinned to its node and to the node's
``institution:<name>`` resource.
"""

from __future__ import annotations

from typing import Literal

import ray

from consortium.inner_loop import InnerTrainer, WorkerConfig
from coordinator.pretraining.spec import PretrainJobSpec


def worker_config(
    spec: PretrainJobSpec, corpus_digest: str, device: Literal["cpu", "gpu"]
) -> WorkerConfig:
    """What a worker needs to know of `spec`, for a worker on `device`."""
    return WorkerConfig(
        model=spec.bytelm_config,
        inner_lr=spec.inner_lr,
        lr_schedule=spec.inner_lr_schedule,
        warmup_steps=spec.inner_warmup_steps,
        total_inner_steps=spec.outer_steps * spec.inner_steps,
        min_lr_ratio=spec.inner_min_lr_ratio,
        weight_decay=spec.inner_weight_decay,
        grad_clip=spec.inner_grad_clip,
        keep_optimizer_state=spec.inner_optimizer_state == "keep",
        batch_size=spec.batch_size,
        seq_len=spec.seq_len,
        num_shards=spec.num_shards,
        corpus_bytes=spec.corpus_bytes,
        validation_bytes=spec.validation_bytes,
        corpus_digest=corpus_digest,
        deterministic=spec.deterministic,
        device=device,
        pseudo_gradient_codec=spec.pseudo_gradient_codec,
    )


# The Ray actor; resources and placement are set by the controller with `.options(...)`.
DiLoCoWorker = ray.remote(max_restarts=0, max_task_retries=0)(InnerTrainer)
