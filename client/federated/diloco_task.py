"""A site's part of federated pretraining: one outer step's inner loop, on its own device.

The coordinator's ``train.diloco`` message (consortium/diloco_wire.py) names the job's
worker config, the shards, the seed and H; the global model comes with it and the
signing mod has already checked it against its digest. The site builds the corpus from
its own standard library (checked against the job's digest, so no training data
crosses the network), takes H AdamW steps from the global weights on its device, and
replies with the pseudo-gradient in the job's codec; the signing mod signs the reply.

The trainer stays loaded between the outer steps of one run (an inner optimizer kept
across steps, ``inner_optimizer_state = "keep"``, needs it); a message of another run
or another config replaces it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Literal

import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from consortium.diloco_wire import (
    COMPUTE_S,
    DEVICE,
    FIRST_INNER_STEP,
    INNER_STEPS,
    ON_GPU,
    SEED,
    SHARD_IDS,
    WORKER_CONFIG,
    DiLoCoTaskError,
    read_worker_config,
    site_device,
)
from consortium.inner_loop import InnerTrainer, enable_determinism, set_deterministic_algorithms
from consortium.model_wire import ARRAYS_RECORD, pack_tensors, unpack_tensors

_lock = threading.Lock()
_kept: dict[tuple[int, str, str], InnerTrainer] = {}  # (run, config, device) -> trainer


def _integer(config: ConfigRecord, key: str, minimum: int = 0) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DiLoCoTaskError(f"config {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _shard_ids(config: ConfigRecord, num_shards: int) -> tuple[int, ...]:
    value = config.get(SHARD_IDS)
    if not isinstance(value, list) or not value:
        raise DiLoCoTaskError(f"config {SHARD_IDS!r} must be a non-empty list of shard ids")
    ids = tuple(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_shards for i in ids):
        raise DiLoCoTaskError(f"config {SHARD_IDS!r} names shards outside 0..{num_shards - 1}")
    return ids  # type: ignore[return-value]  # checked above: every id is an int


def trainer_for(run_id: int, config_json: str, device: str) -> InnerTrainer:
    """The run's trainer for this config and device, built on its first message."""
    kind: Literal["cpu", "gpu"] = "gpu" if device.startswith("cuda") else "cpu"
    key = (run_id, config_json, device)
    with _lock:
        trainer = _kept.get(key)
        if trainer is None:
            _kept.clear()  # one job's trainer at a time
            trainer = InnerTrainer(read_worker_config(config_json, kind), torch_device=device)
            _kept[key] = trainer
        return trainer


@contextlib.contextmanager
def torch_settings(deterministic: bool, device: str, threads: int) -> Iterator[None]:
    """Deterministic kernels on one thread for a deterministic job (what spot checks and
    replays re-execute), else the site's `torch-threads`; the process's settings are
    restored after the step, since `client join` runs other jobs' tasks too."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    try:
        if deterministic:
            enable_determinism("gpu" if device.startswith("cuda") else "cpu")
        else:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(saved[0])
        set_deterministic_algorithms(saved[1])


def run_diloco_step(msg: Message, node_config: Mapping[str, object]) -> Message:
    """The reply to one ``train.diloco`` message: the encoded pseudo-gradient and metrics."""
    config = msg.content.config_records["config"]
    # The site's own device, as far as the job allows; never one the message names.
    device = site_device(str(config.get(DEVICE, "auto")), str(node_config.get("device", "cpu")))
    threads = node_config.get("torch-threads", 1)
    threads = threads if isinstance(threads, int) and not isinstance(threads, bool) else 1
    steps = _integer(config, INNER_STEPS, minimum=1)
    config_json = str(config.get(WORKER_CONFIG, ""))
    with torch_settings(
        read_worker_config(config_json, "cpu").deterministic, device, max(threads, 1)
    ):
        trainer = trainer_for(msg.metadata.run_id, config_json, device)
        shard_ids = _shard_ids(config, trainer.config.num_shards)
        weights = dict(unpack_tensors(msg.content.array_records[ARRAYS_RECORD]))
        sent, metrics = trainer.run_inner(
            weights, shard_ids, steps, _integer(config, SEED), _integer(config, FIRST_INNER_STEP)
        )
    content = RecordDict(
        {
            ARRAYS_RECORD: pack_tensors(sent),
            "metrics": MetricRecord(
                {
                    "num-examples": steps * trainer.config.batch_size,
                    "train_loss": metrics.mean_loss,
                    COMPUTE_S: metrics.compute_s,
                    ON_GPU: int(metrics.device == "gpu"),
                }
            ),
        }
    )
    return Message(content=content, reply_to=msg)
