"""A real federated job, run once per session (once per pytest-xdist worker that runs a
module reading it: `make test` uses --dist loadfile) and shared by the tests that read it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Processes
from tests.helpers import (
    FEDERATED_PRETRAIN,
    CompletedRun,
    local_consortium,
    online_nodes,
    run_to_end,
    wait_for,
    write_partitions,
)

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

# Then the same two sites pretrain together, each on its own CPU behind the federated
# channel; the coordinator re-executes every contribution (verify_fraction = 1).
PRETRAIN_JOB = f"""\
name = "integration-pretrain"
{FEDERATED_PRETRAIN}inner_steps = 5
outer_steps = 3
min_workers = 2
pseudo_gradient_codec = "int8"
device = "cpu"
deterministic = true
inner_optimizer_state = "reset"
verify_fraction = 1.0
"""


@pytest.fixture(scope="session")
def completed_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CompletedRun]:
    """Coordinator + two onboarded institutions (mutual TLS, SuperNode authentication,
    no Ray: neither job uses it) complete a 3-round job on loopback, then a 3-step
    federated pretraining job, then stop. test_federated_job.py reads it (one module,
    so one xdist worker runs it once)."""
    root = tmp_path_factory.mktemp("federated")
    processes = Processes(root / "logs")
    try:
        names = ["alpha-hospital", "beta-university"]
        consortium = local_consortium(processes, root, preload_client_app=True)
        consortium.init()
        consortium.serve()
        for name in names:
            consortium.onboard(name)
        wait_for("SuperNode keys registered", consortium.supernode_keys_registered)
        for name, site in zip(names, write_partitions(root, names), strict=True):
            consortium.join(name, site)
        with consortium.connect() as remote:
            wait_for("two online nodes", lambda: online_nodes(remote.list_nodes()) == 2)
            job = run_to_end(remote, JOB, processes)
            reply = remote.get(job.job_id)
            pretrain = run_to_end(remote, PRETRAIN_JOB, processes)
            pretrain_reply = remote.get(pretrain.job_id)
            # Clients leave first (Ctrl-C equivalent), so the registry shows them gone.
            for child in processes.children[1:]:
                child.stop()
            nodes = remote.list_nodes()
        processes.stop_all()
        site_logs = [child.log_path.read_text() for child in processes.children[1:]]
        yield CompletedRun(
            consortium.data_dir,
            reply.job,
            list(reply.rounds),
            nodes,
            processes.alive(),
            pretrain_reply.job,
            list(pretrain_reply.rounds),
            site_logs,
        )
    finally:
        processes.stop_all()
