"""A pretraining job end to end: `coordinator serve` with its Ray head, one real
`client join` whose Ray worker joins it, a tiny DiLoCo run submitted over the API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from consortium.proto.v1 import jobs_pb2, jobs_pb2_grpc
from coordinator.cli.remote import Remote
from coordinator.data_dir import DataDir
from tests.conftest import Processes
from tests.helpers import (
    FINAL_STATES,
    TINY_PRETRAIN,
    join_site,
    online_nodes,
    run_cli,
    start_coordinator,
    wait_for,
    write_partitions,
)

INSTITUTION = "aurora"
OUTER_STEPS = 2
JOB_TIMEOUT_S = 150.0

PRETRAIN_JOB = f"""\
name = "tiny-pretrain"
{TINY_PRETRAIN}inner_steps = 5
outer_steps = {OUTER_STEPS}
min_workers = 1
wait_for_workers_s = 30.0
worker_start_timeout_s = 120.0
step_timeout_s = 120.0
"""


@dataclass
class Site:
    address: str
    data_dir: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """An insecure coordinator (so Ray runs without a token) and one joined node."""
    root = tmp_path_factory.mktemp("pretrain-job")
    processes = Processes(root / "logs")
    try:
        data_dir = root / "coordinator"
        address = start_coordinator(processes, data_dir, ray=True)
        (data,) = write_partitions(root, [INSTITUTION])
        join_site(
            processes,
            "client",
            data,
            root / "state",
            coordinator=address,
            institution=INSTITUTION,
            ray=True,
        )
        with Remote(address) as remote:
            wait_for(
                "the node online",
                lambda: online_nodes(remote.list_nodes()) > 0,
            )
        yield Site(address, data_dir)
    finally:
        processes.stop_all()


def test_pretrain_job_succeeds_on_contributed_node_with_provenance_and_accounting(
    site: Site,
) -> None:
    with Remote(site.address) as remote:
        job = remote.submit(PRETRAIN_JOB)
        assert job.rounds_total == OUTER_STEPS
        wait_for(
            "the pretraining job to end",
            lambda: remote.get(job.job_id).job.state in FINAL_STATES,
            timeout_s=JOB_TIMEOUT_S,
        )
        reply = remote.get(job.job_id)
    assert reply.job.state == jobs_pb2.JOB_STATE_SUCCEEDED, reply.job.message
    assert [r.round for r in reply.rounds] == [1, 2]
    assert all(r.participants == 1 and "val_loss" in r.metrics for r in reply.rounds)
    model = site.data_dir / "models" / f"{job.job_id}.safetensors"
    assert model.is_file() and reply.job.model_path == str(model)

    shown = run_cli(
        "coordinator", "accounting", "--job", job.job_id, "--data-dir", str(site.data_dir)
    )
    assert shown.returncode == 0, shown.stderr
    assert INSTITUTION in shown.stdout

    verified = run_cli("coordinator", "provenance", "verify", "--data-dir", str(site.data_dir))
    assert verified.returncode == 0, verified.stderr
    entries = [
        json.loads(line) for line in DataDir(site.data_dir).provenance_log.read_text().splitlines()
    ]
    steps = [
        e["body"]
        for e in entries
        if e.get("type") == "outer_step" and e["body"]["job_id"] == job.job_id
    ]
    assert [s["step"] for s in steps] == [0, 1]
    assert all(w["institution"] == INSTITUTION for s in steps for w in s["workers"])
    assert steps[-1]["val_loss"] == pytest.approx(reply.rounds[-1].metrics["val_loss"])


def test_pretrain_spec_with_zero_inner_steps_is_invalid_argument(site: Site) -> None:
    spec = PRETRAIN_JOB.replace("inner_steps = 5", "inner_steps = 0")
    with grpc.insecure_channel(site.address) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_toml=spec), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "field 'inner_steps'" in raised.value.details()
