"""The DiLoCo worker of the Ray pool: `consortium.inner_loop.InnerTrainer` as a Ray actor
(`PoolTrainer`).

The controller places one per contributed GPU (``num_gpus=1``) or, on nodes without
GPUs, one per CPU slot (``num_cpus=1``), pinned to its node and to the node's
``institution:<name>`` resource.
"""

from __future__ import annotations

import ray

from consortium.inner_loop import InnerTrainer, WorkerConfig
from consortium.startup import freeze_what_is_loaded


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
