"""What stays loaded at a site between a job's messages: its workload's site data, and
the workload's model where the workload allows it.

`client join` runs the ClientApp in its own long-lived process (the task runner), not in
a new process per message as Flower's launcher does, so what one message loaded can
serve the next: the site's dataset is read once per job instead of once per message,
and a workload that sets `keep_model_loaded = True` has its model built once per job,
each message then copying the received tensors into it (`load_exchanged`). That is the
part that matters for a large model: its frozen weights stay in memory, only what
travels changes. A workload may set it only if every tensor its `train` changes is one
it exchanges (the built-in ones exchange every parameter).

Everything loaded belongs to one Flower run (one job's run): the first message of
another run drops it all, so a job never sees what an earlier one loaded (a site may
change its data between jobs). At most `max_models` models are kept at once, and no
more than the site's memory budget (setting `trainer_memory_mb`: their parameters and
buffers): the least recently used go first, and a model larger than the whole budget
is built for each message instead of kept.
Every check the site makes before running a task (run approval, allowed workloads,
the signing mod's checks) runs for every message as before.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consortium.workloads import Workload, WorkloadOptions

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

DEFAULT_MAX_MODELS = 2
DEFAULT_MEMORY_BUDGET_BYTES = 8 * 2**30


def model_bytes(model: nn.Module) -> int:
    """What a model holds in memory: its parameters' and buffers' bytes."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class SiteTrainer:
    def __init__(
        self,
        max_models: int = DEFAULT_MAX_MODELS,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    ) -> None:
        self._max_models = max_models
        self.memory_budget_bytes = memory_budget_bytes  # `client join` sets the site's
        self._lock = threading.Lock()
        self._run_id: int | None = None
        self._data: dict[tuple[str, str, str], Any] = {}
        self._models: OrderedDict[tuple[str, str], tuple[nn.Module, int]] = OrderedDict()
        self.data_loads = 0
        self.model_builds = 0

    @property
    def kept_bytes(self) -> int:
        return sum(size for _, size in self._models.values())

    def data(self, run_id: int, name: str, workload: Workload, data_dir: Path, dataset: str) -> Any:
        """The site's `dataset` as `workload` reads it, loaded once per run."""
        with self._lock:
            self._enter(run_id)
            key = (name, str(data_dir.resolve()), dataset)
            if key not in self._data:
                self._data[key] = workload.load_site_data(data_dir, dataset)
                self.data_loads += 1
            return self._data[key]

    def model(
        self, run_id: int, name: str, workload: Workload, options: WorkloadOptions
    ) -> nn.Module:
        """`workload`'s model with `options`: built once per run when the workload keeps
        its model loaded, else for every message. The caller loads the received tensors."""
        if not getattr(workload, "keep_model_loaded", False):
            self.model_builds += 1
            return workload.build_model(options)
        with self._lock:
            self._enter(run_id)
            key = (name, json.dumps(dict(options), sort_keys=True))
            kept = self._models.get(key)
            if kept is not None:
                self._models.move_to_end(key)
                return kept[0]
            model = workload.build_model(options)
            self.model_builds += 1
            size = model_bytes(model)
            if size > self.memory_budget_bytes:
                log.warning(
                    "workload %s's model holds %.1f MiB, over the site trainer's budget of "
                    "%.1f MiB (trainer_memory_mb): it is built again for every message",
                    name,
                    size / 2**20,
                    self.memory_budget_bytes / 2**20,
                )
                return model
            self._models[key] = (model, size)
            while len(self._models) > self._max_models or (
                self.kept_bytes > self.memory_budget_bytes
            ):
                self._models.popitem(last=False)  # the least recently used
            return model

    def _enter(self, run_id: int) -> None:
        if run_id != self._run_id:  # another job's run: nothing of the last one is kept
            self._data.clear()
            self._models.clear()
            self._run_id = run_id
