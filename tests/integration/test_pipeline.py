"""The pretrain-then-fine-tune pipeline on real servers, as deployed: onboarded
institutions over mutual TLS, a token-authenticated Ray cluster. A pretraining job
runs on the contributed Ray workers, then a federated fine-tune of its model on each
site's own text, started from the pretrained model's signed digest."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from consortium.errors import InvalidArgumentError
from consortium.proto.v1 import jobs_pb2
from coordinator.cli.remote import Remote, connect
from coordinator.data_dir import DataDir
from tests.conftest import Processes
from tests.helpers import (
    FINAL_STATES,
    join_site,
    online_nodes,
    start_secure_consortium,
    wait_for,
    write_text_partitions,
)

INSTITUTIONS = ("aurora", "borealis")
JOB_TIMEOUT_S = 240.0

PRETRAIN = """\
name = "pipeline-pretrain"
kind = "pretrain"
n_layer = 1
n_head = 2
n_embd = 32
block_size = 32
seq_len = 32
batch_size = 8
inner_steps = 10
outer_steps = 2
num_shards = 4
corpus_bytes = 65536
validation_bytes = 4096
eval_batches = 2
min_workers = 2
wait_for_workers_s = 60.0
worker_start_timeout_s = 120.0
step_timeout_s = 120.0
"""

FINE_TUNE = """\
name = "pipeline-finetune"
model = "bytelm"
dataset = "docstrings"
init_from = "{source}"
rounds = 2
min_clients = 2
local_steps = 15
seq_len = 32
batch_size = 8
learning_rate = 0.003
eval_batches = 4
"""


@dataclass
class Pipeline:
    data_dir: Path
    pretrain: jobs_pb2.GetJobResponse
    fine_tune: jobs_pb2.GetJobResponse
    address: str


def finished(remote: Remote, job_id: str) -> jobs_pb2.GetJobResponse:
    wait_for(
        f"job {job_id} to end",
        lambda: remote.get(job_id).job.state in FINAL_STATES,
        timeout_s=JOB_TIMEOUT_S,
    )
    return remote.get(job_id)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    root = tmp_path_factory.mktemp("pipeline")
    processes = Processes(root / "logs")
    try:
        data_dir, address = start_secure_consortium(processes, root, INSTITUTIONS, ray=True)
        sites = write_text_partitions(root, list(INSTITUTIONS))
        for name, site in zip(INSTITUTIONS, sites, strict=True):
            join_site(
                processes,
                f"client-{name}",
                site,
                root / name / "state",
                bundle=root / name / "bundle",
                ray=True,
            )
        with connect(address, data_dir) as remote:
            wait_for(
                "two nodes online",
                lambda: online_nodes(remote.list_nodes()) == len(INSTITUTIONS),
            )
            # Both are submitted at once: the fine-tune waits for its source.
            pretrain = remote.submit(PRETRAIN)
            fine_tune = remote.submit(FINE_TUNE.format(source=pretrain.job_id))
            yield Pipeline(
                data_dir,
                finished(remote, pretrain.job_id),
                finished(remote, fine_tune.job_id),
                address,
            )
    finally:
        processes.stop_all()


def log_bodies(data_dir: Path, type_: str, job_id: str) -> list[dict[str, Any]]:
    entries = [
        json.loads(line) for line in DataDir(data_dir).provenance_log.read_text().splitlines()
    ]
    return [
        e["body"] for e in entries if e.get("type") == type_ and e["body"].get("job_id") == job_id
    ]


def test_fine_tune_starts_from_the_pretrained_models_signed_digest(pipeline: Pipeline) -> None:
    assert pipeline.pretrain.job.state == jobs_pb2.JOB_STATE_SUCCEEDED, (
        pipeline.pretrain.job.message
    )
    assert pipeline.fine_tune.job.state == jobs_pb2.JOB_STATE_SUCCEEDED, (
        pipeline.fine_tune.job.message
    )
    (finished_pretrain,) = log_bodies(
        pipeline.data_dir, "job_completed", pipeline.pretrain.job.job_id
    )
    (started,) = log_bodies(pipeline.data_dir, "job_started", pipeline.fine_tune.job.job_id)
    assert started["init_from"] == {
        "job_id": pipeline.pretrain.job.job_id,
        "model_digest": finished_pretrain["final_model_digest"],
    }
    # Nothing trained yet at round 0: the global model is exactly the pretrained one.
    assert started["initial_model_digest"] == finished_pretrain["final_model_digest"]
    assert started["model"] == {
        "name": "bytelm",
        "options": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
    }


def test_fine_tune_lowers_held_out_perplexity_on_site_text(pipeline: Pipeline) -> None:
    rounds = {r.round: r for r in pipeline.fine_tune.rounds}
    assert sorted(rounds) == [0, 1, 2]
    before = rounds[0].metrics["eval_perplexity"]
    after = rounds[2].metrics["eval_perplexity"]
    assert after < before
    assert all(rounds[r].participants == len(INSTITUTIONS) for r in (1, 2))
    (completed,) = log_bodies(pipeline.data_dir, "job_completed", pipeline.fine_tune.job.job_id)
    datasets = [
        update["data"]["dataset"]
        for body in log_bodies(pipeline.data_dir, "round", pipeline.fine_tune.job.job_id)
        for update in body["updates"]
    ]
    # Each site committed to its own text: 2 updates in each of 2 rounds.
    assert datasets == ["docstrings"] * 4
    assert completed["final_model_digest"] != finished_pretrain_digest(pipeline)


def finished_pretrain_digest(pipeline: Pipeline) -> str:
    (body,) = log_bodies(pipeline.data_dir, "job_completed", pipeline.pretrain.job.job_id)
    return str(body["final_model_digest"])


@pytest.mark.parametrize(
    ("init_from", "field"),
    [("000000000000", "field 'init_from'"), (None, "field 'model'")],
)
def test_bad_init_from_is_invalid_argument(
    pipeline: Pipeline, init_from: str | None, field: str
) -> None:
    spec = FINE_TUNE.format(source=init_from or pipeline.pretrain.job.job_id)
    if init_from is None:  # a pretraining job produces a bytelm, not a digits CNN
        spec = spec.replace('model = "bytelm"', 'model = "digits-cnn"').replace(
            'dataset = "docstrings"', 'dataset = "digits"'
        )
    with connect(pipeline.address, pipeline.data_dir) as remote:
        before = len(remote.list_jobs())
        with pytest.raises(InvalidArgumentError, match=field):  # INVALID_ARGUMENT
            remote.submit(spec)
        assert len(remote.list_jobs()) == before
