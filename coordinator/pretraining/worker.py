"""The DiLoCo worker of the Ray pool: `consortium.inner_loop.InnerTrainer` as a Ray actor
(`PoolTrainer`).

The controller places one per contributed GPU (``num_gpus=1``) or, on nodes without
GPUs, one per CPU slot (``num_cpus=1``), pinned to its node and to the node's
``institution:<name>`` resource.
"""

from __future__ import annotations

from typing import Literal

import ray

from consortium.inner_loop import InnerTrainer, WorkerConfig
from consortium.startup import freeze_what_is_loaded
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


class PoolTrainer(InnerTrainer):
    """`InnerTrainer` in a Ray worker process of its own. Ray's worker loaded torch and
    the model code as it unpickled this class, with the garbage collector running; the
    trainer freezes what is loaded before it builds its model (consortium/startup.py), so
    the collector does not walk torch's objects again at each full collection of its
    training loop and at its exit."""

    def __init__(self, config: WorkerConfig, torch_device: str | None = None) -> None:
        freeze_what_is_loaded()
        super().__init__(config, torch_device)


# The Ray actor; resources and placement are set by the controller with `.options(...)`.
DiLoCoWorker = ray.remote(max_restarts=0, max_task_retries=0)(PoolTrainer)
