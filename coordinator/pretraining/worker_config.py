"""What a DiLoCo worker needs to know of a pretraining job: its `WorkerConfig`.

Apart from the Ray actor (coordinator/pretraining/worker.py) so that the code that runs
the inner loop without Ray (the sites' federated pretraining, spot checks, `coordinator
replay`) does not import Ray for it.
"""

from __future__ import annotations

from typing import Literal

from consortium.inner_loop import WorkerConfig
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
