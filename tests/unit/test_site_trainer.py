"""What a site keeps loaded between a job's messages (client/federated/site_trainer.py)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from client.federated.site_trainer import SiteTrainer
from consortium.workloads import Workload


class CountingWorkload:
    """A workload (protocol complete) that counts what it builds and loads."""

    datasets: frozenset[str] = frozenset()

    def __init__(self, keep_model_loaded: bool) -> None:
        self.keep_model_loaded = keep_model_loaded
        self.builds = 0
        self.loads = 0

    def parameter_count(self, options: Any) -> int:
        return 2

    def build_model(self, options: Any) -> nn.Module:
        self.builds += 1
        width = int(options.get("size", 1))
        return nn.Linear(width, width)  # width * (width + 1) float32 parameters

    def exchanged(self, model: nn.Module) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(model.state_dict())

    def load_exchanged(self, model: nn.Module, tensors: Any) -> None:
        model.load_state_dict(tensors)

    def load_site_data(self, data_dir: Path, dataset: str) -> Any:
        self.loads += 1
        return (data_dir, dataset, self.loads)

    def train(self, *args: Any) -> Any:
        raise NotImplementedError

    def evaluate(self, *args: Any) -> Any:
        raise NotImplementedError

    def held_out(self, *args: Any) -> None:
        return None


def test_a_job_reads_its_data_and_builds_its_model_once(tmp_path: Path) -> None:
    workload = CountingWorkload(keep_model_loaded=True)
    assert isinstance(workload, Workload)
    trainer = SiteTrainer()
    first = [trainer.model(7, "w", workload, {}), trainer.data(7, "w", workload, tmp_path, "d")]
    again = [trainer.model(7, "w", workload, {}), trainer.data(7, "w", workload, tmp_path, "d")]
    assert first[0] is again[0] and first[1] == again[1]
    assert (workload.builds, workload.loads) == (1, 1)
    # Other options are another model; another dataset is read on its own.
    assert trainer.model(7, "w", workload, {"size": 2}) is not first[0]
    trainer.data(7, "w", workload, tmp_path, "other")
    assert (workload.builds, workload.loads) == (2, 2)


def test_another_run_starts_from_nothing(tmp_path: Path) -> None:
    workload = CountingWorkload(keep_model_loaded=True)
    trainer = SiteTrainer()
    model = trainer.model(7, "w", workload, {})
    data = trainer.data(7, "w", workload, tmp_path, "d")
    assert trainer.model(8, "w", workload, {}) is not model
    assert trainer.data(8, "w", workload, tmp_path, "d") != data  # read again
    assert (workload.builds, workload.loads) == (2, 2)


def test_a_workload_that_does_not_keep_its_model_gets_a_new_one_each_message(
    tmp_path: Path,
) -> None:
    workload = CountingWorkload(keep_model_loaded=False)
    trainer = SiteTrainer()
    assert trainer.model(7, "w", workload, {}) is not trainer.model(7, "w", workload, {})
    assert workload.builds == 2


def test_at_most_max_models_are_kept(tmp_path: Path) -> None:
    workload = CountingWorkload(keep_model_loaded=True)
    trainer = SiteTrainer(max_models=2)
    oldest = trainer.model(7, "w", workload, {"size": 1})
    trainer.model(7, "w", workload, {"size": 2})
    trainer.model(7, "w", workload, {"size": 3})  # evicts the least recently used
    assert trainer.model(7, "w", workload, {"size": 1}) is not oldest
    assert workload.builds == 4


def test_models_are_kept_within_the_memory_budget(tmp_path: Path) -> None:
    workload = CountingWorkload(keep_model_loaded=True)
    # Linear(16, 16) holds 16 * 17 * 4 = 1088 bytes: two fit in 2500, three do not.
    trainer = SiteTrainer(max_models=8, memory_budget_bytes=2500)
    first = trainer.model(7, "w", workload, {"size": 16})
    second = trainer.model(7, "w", workload, {"size": 16, "other": 1})
    assert trainer.kept_bytes == 2 * 1088
    assert trainer.model(7, "w", workload, {"size": 16}) is first  # now the most recent
    trainer.model(7, "w", workload, {"size": 16, "third": 1})  # evicts `second`
    assert trainer.kept_bytes == 2 * 1088
    assert trainer.model(7, "w", workload, {"size": 16}) is first
    assert trainer.model(7, "w", workload, {"size": 16, "other": 1}) is not second
    assert workload.builds == 4


def test_a_model_over_the_whole_budget_is_built_for_every_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    workload = CountingWorkload(keep_model_loaded=True)
    trainer = SiteTrainer(memory_budget_bytes=1000)
    small = trainer.model(7, "w", workload, {"size": 2})
    with caplog.at_level(logging.WARNING, logger="client.federated.site_trainer"):
        large = trainer.model(7, "w", workload, {"size": 32})  # 4224 bytes
    assert "w's model holds 0.0 MiB, over the site trainer's budget of 0.0 MiB" in caplog.text
    assert "(trainer_memory_mb)" in caplog.text
    assert trainer.model(7, "w", workload, {"size": 32}) is not large
    assert trainer.model(7, "w", workload, {"size": 2}) is small  # still kept
    assert workload.builds == 3
