"""The federated pretraining message: what the coordinator asks of a site for one outer
step, and how the site reads it (shared by both roles).

The coordinator sends a ``train.diloco`` message to each site it plans for the step::

    arrays  ARRAYS_RECORD   the global model (consortium/model_wire.py)
    config  "config"        job-id, round-number (outer step + 1), global-digest,
                            worker-config (JSON below), device, shard-ids, seed,
                            inner-steps, first-inner-step

The site checks the global model against ``global-digest`` and cosigns the log head the
message carries (client/federated/signing_mod.py), runs the inner loop
(`consortium.inner_loop.InnerTrainer`) on its own device, and replies with its
pseudo-gradient, encoded with the job's codec, in ARRAYS_RECORD, the metrics
``num-examples`` (sequences trained on), ``train_loss``, ``compute-s`` and ``on-gpu``,
all signed with the institution's key. Which device is the site's (its ``client join
--gpu``); the job only says whether it must, may or must not be a GPU.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from consortium.errors import TaskRefusedError
from consortium.inner_loop import WorkerConfig
from consortium.models import MAX_PARAMETERS, step_tokens_problem

MESSAGE_TYPE = "train.diloco"
WORKER_CONFIG = "worker-config"
SHARD_IDS = "shard-ids"
SEED = "seed"
INNER_STEPS = "inner-steps"
FIRST_INNER_STEP = "first-inner-step"
DEVICE = "device"  # the job's device: "cpu" (even at a GPU site), "gpu" (refused without
# one) or "auto" (the site's own)
COMPUTE_S = "compute-s"  # the inner loop's wall-clock seconds at the site (its word)
ON_GPU = "on-gpu"  # 1 when the site trained on a GPU, else 0 (its word)

_CONFIG_ADAPTER = TypeAdapter(WorkerConfig)


class DiLoCoTaskError(TaskRefusedError, ValueError):
    """A federated pretraining message the site cannot act on."""


def worker_config_json(config: WorkerConfig) -> str:
    """The job's worker config as the message carries it (without the device)."""
    fields = dataclasses.asdict(config)
    del fields["device"]
    return json.dumps(fields, sort_keys=True)


def site_device(job_device: str, site_device: str) -> str:
    """The torch device a site trains a step on: its own (``client join --gpu N``: ``cuda:N``,
    else ``cpu``) as the job allows; DiLoCoTaskError when it cannot serve the job."""
    if job_device == "cpu":
        return "cpu"
    if job_device == "gpu" and not site_device.startswith("cuda"):
        raise DiLoCoTaskError(
            "the job trains on GPUs and this site joined without one (client join --gpu N)"
        )
    if job_device not in ("gpu", "auto"):
        raise DiLoCoTaskError(f"config {DEVICE!r} must be cpu, gpu or auto, got {job_device!r}")
    return site_device


def read_worker_config(text: str, device: Literal["cpu", "gpu"]) -> WorkerConfig:
    """The worker config a message carries, for a worker on `device`; a malformed one
    raises DiLoCoTaskError naming what is wrong."""
    try:
        fields: Any = json.loads(text)
        if not isinstance(fields, dict):
            raise DiLoCoTaskError("the worker config is not a JSON object")
        config = _CONFIG_ADAPTER.validate_python({**fields, "device": device}, strict=False)
    except DiLoCoTaskError:
        raise
    except (ValueError, ValidationError) as error:
        raise DiLoCoTaskError(f"the worker config cannot be read: {error}") from None
    parameters = config.model.num_parameters()
    if parameters > MAX_PARAMETERS:  # the bound a job spec has: no larger model trains here
        raise DiLoCoTaskError(
            f"the model has {parameters:,} parameters, more than this site trains "
            f"({MAX_PARAMETERS:,})"
        )
    if (problem := step_tokens_problem(config.batch_size, config.seq_len)) is not None:
        raise DiLoCoTaskError(f"the worker config's step is too large: {problem}")
    if config.seq_len > config.model.block_size:
        raise DiLoCoTaskError(
            f"the worker config's seq_len {config.seq_len} is over the model's block_size "
            f"{config.model.block_size}"
        )
    return config
