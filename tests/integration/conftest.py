"""A real federated job, run once per session and shared by the tests that read it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from consortium.proto.v1 import jobs_pb2, nodes_pb2
from coordinator.access.onboarding import init_consortium
from coordinator.cli.remote import connect
from coordinator.demo import onboard_local_site, supernode_keys_registered, write_partitions
from tests.conftest import Processes, join_site, online_nodes, start_coordinator, wait_for

JOB = """\
name = "integration"
model = "digits-cnn"
dataset = "digits"
strategy = "fedprox"
proximal_mu = 0.01
rounds = 3
min_clients = 2
local_epochs = 1
learning_rate = 0.05
seed = 3
"""
FINAL_STATES = (
    jobs_pb2.JOB_STATE_SUCCEEDED,
    jobs_pb2.JOB_STATE_FAILED,
    jobs_pb2.JOB_STATE_CANCELLED,
)


@dataclass
class CompletedRun:
    data_dir: Path
    job: jobs_pb2.Job
    rounds: list[jobs_pb2.RoundMetrics]
    nodes_after_leave: list[nodes_pb2.Node]
    leftover_pids: list[int]


def start_secure_consortium(
    processes: Processes,
    root: Path,
    names: Iterable[str],
    *,
    wait_for_keys: bool = True,
    flags: Sequence[str] = (),
) -> tuple[Path, str]:
    """`coordinator init`, a mutual-TLS `coordinator serve`, and each institution
    onboarded from site-held keys (bundle in root/<name>/bundle); returns the data dir
    and the API address, once the SuperLink knows the sites' keys (unless told not to
    wait)."""
    data_dir = root / "coordinator"
    init_consortium(data_dir, ["localhost", "127.0.0.1"], cert_days=30)
    address = start_coordinator(processes, data_dir, secure=True, flags=flags)
    for name in names:
        onboard_local_site(data_dir, root / name, name, address)
    if wait_for_keys:
        wait_for("SuperNode keys registered", lambda: supernode_keys_registered(data_dir))
    return data_dir, address


@pytest.fixture(scope="session")
def completed_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CompletedRun]:
    """Coordinator + two onboarded institutions (mutual TLS, SuperNode authentication)
    complete a 3-round job on loopback, then stop."""
    root = tmp_path_factory.mktemp("federated")
    processes = Processes(root / "logs")
    try:
        names = ["alpha-hospital", "beta-university"]
        data_dir, address = start_secure_consortium(processes, root, names)
        for name, site in zip(names, write_partitions(root, names), strict=True):
            join_site(
                processes,
                f"client-{name}",
                site,
                root / name / "state",
                bundle=root / name / "bundle",
            )
        with connect(address, data_dir) as remote:
            wait_for(
                "two online nodes",
                lambda: online_nodes(remote.list_nodes()) == 2,
            )
            job = remote.submit(JOB)
            final = None
            for event in remote.watch(job.job_id):
                processes.remember_descendants()  # Flower's helpers, to check they end
                if event.HasField("job") and event.job.state in FINAL_STATES:
                    final = event.job
            assert final is not None, "the watch stream ended before the job did"
            reply = remote.get(job.job_id)
            # Clients leave first (Ctrl-C equivalent), so the registry shows them gone.
            for child in processes.children[1:]:
                child.stop()
            nodes = remote.list_nodes()
        processes.stop_all()
        yield CompletedRun(data_dir, reply.job, list(reply.rounds), nodes, processes.alive())
    finally:
        processes.stop_all()
