"""`coordinator demo`: the whole consortium on one machine.

Starts `coordinator serve` and one `client join` per institution as separate
processes on loopback, gives each institution a non-IID Dirichlet(0.5) share of
the digits training pool, submits a federated job, shows its progress, and
stops every process it started, also on Ctrl-C or failure.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console

from consortium.data.digits import train_test_split
from consortium.data.npz import save_npz
from consortium.data.partition import dirichlet_partition
from consortium.errors import ChildProcessFailedError
from consortium.processes import ChildProcess, venv_executable
from consortium.proto.v1 import jobs_pb2, nodes_pb2
from consortium.site_keys import create_site_keys
from coordinator.cli.remote import Remote, connect
from coordinator.cli.watch import watch_job
from coordinator.onboarding import Request, init_consortium, onboard
from coordinator.state import SqliteStateStore

INSTITUTION_NAMES = (
    "aurora-hospital",
    "borealis-university",
    "cascade-lab",
    "delta-clinic",
    "echo-institute",
    "fjord-college",
    "gamma-centre",
    "helix-labs",
)
DIRICHLET_ALPHA = 0.5
PARTITION_SEED = 7
START_TIMEOUT_S = 120.0

DEMO_JOB = """\
name = "digits-fedavg-demo"
kind = "federated"
model = "digits-cnn"
dataset = "digits"
strategy = "fedavg"
rounds = {rounds}
min_clients = {clients}
local_epochs = 2
learning_rate = 0.05
batch_size = 32
seed = 0
"""


def write_partitions(work_dir: Path, names: list[str]) -> list[Path]:
    """Each institution's own data dir with its Dirichlet share as digits.npz."""
    train, _ = train_test_split()
    parts = dirichlet_partition(train.y, len(names), DIRICHLET_ALPHA, PARTITION_SEED)
    dirs = []
    for name, indices in zip(names, parts, strict=True):
        site = work_dir / "institutions" / name / "data"
        save_npz(site / "digits.npz", train.x[indices], train.y[indices])
        dirs.append(site)
    return dirs


def onboard_local_site(coordinator_dir: Path, site_dir: Path, name: str, address: str) -> Path:
    """`client keygen` at the site, then `coordinator onboard --request` at the operator."""
    keys = create_site_keys(site_dir / "state", name)
    store = SqliteStateStore(coordinator_dir / "state.db")
    try:
        return onboard(
            coordinator_dir,
            store,
            name,
            Request.from_dir(keys.request_dir),
            site_dir / "bundle",
            address,
            cert_days=30,
        )
    finally:
        store.close()


def supernode_keys_registered(coordinator_dir: Path) -> bool:
    store = SqliteStateStore(coordinator_dir / "state.db")
    try:
        return all(node_id for _, _, node_id in store.supernode_keys())
    finally:
        store.close()


def wait_until(
    what: str, ready: Callable[[], bool], children: list[ChildProcess], timeout_s: float
) -> None:
    """Poll `ready` until true; fail early, with the log tail, if a child died."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        for child in children:
            if child.poll() is not None:
                raise ChildProcessFailedError(
                    f"{child.name} exited with code {child.poll()} while waiting for {what}; "
                    f"see {child.log_path}:\n{child.log_tail()}"
                )
        if time.monotonic() > deadline:
            raise ChildProcessFailedError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def run_demo(work_dir: Path, rounds: int, num_institutions: int, console: Console) -> int:
    """Run the demo; returns the job's final state (a jobs_pb2.JobState value)."""
    if work_dir.exists():
        shutil.rmtree(work_dir)
    names = list(INSTITUTION_NAMES[:num_institutions])
    data_dirs = write_partitions(work_dir, names)
    for name, data_dir in zip(names, data_dirs, strict=True):
        with np.load(data_dir / "digits.npz") as archive:
            count = len(archive["y"])
        console.print(f"[dim]{name}: {count} private digit images in {data_dir}[/]")
    coordinator_dir = work_dir / "coordinator"
    children: list[ChildProcess] = []
    try:
        console.print("coordinator init: root CA, certificates, signing key, Ray token")
        init_consortium(coordinator_dir, ["localhost", "127.0.0.1"], cert_days=30)
        console.print("starting the coordinator (mTLS control-plane API + Flower SuperLink)...")
        children.append(
            ChildProcess(
                "coordinator serve",
                [venv_executable("coordinator"), "serve", "--data-dir", str(coordinator_dir)],
                work_dir / "logs" / "coordinator.log",
            )
        )
        address_file = coordinator_dir / "coordinator.address"
        wait_until("the coordinator", address_file.exists, children, START_TIMEOUT_S)
        address = address_file.read_text().strip()
        for name in names:
            site = work_dir / "institutions" / name
            bundle = onboard_local_site(coordinator_dir, site, name, address)
            console.print(f"onboarded {name}: keys at the site, bundle {bundle}")
        wait_until(
            "the SuperLink to accept the onboarded SuperNode keys",
            lambda: supernode_keys_registered(coordinator_dir),
            children,
            START_TIMEOUT_S,
        )
        for name, data_dir in zip(names, data_dirs, strict=True):
            site = work_dir / "institutions" / name
            children.append(
                ChildProcess(
                    f"client join ({name})",
                    [
                        venv_executable("client"),
                        "join",
                        "--bundle",
                        str(site / "bundle"),
                        "--data",
                        str(data_dir),
                        "--state-dir",
                        str(site / "state"),
                    ],
                    work_dir / "logs" / f"client-{name}.log",
                )
            )
        with connect(address, coordinator_dir) as remote:

            def all_online() -> bool:
                online = [n for n in remote.list_nodes() if n.state == nodes_pb2.NODE_STATE_ONLINE]
                return len(online) >= num_institutions

            console.print(f"waiting for {num_institutions} institutions to join...")
            wait_until("the institutions to join", all_online, children, START_TIMEOUT_S)
            job = remote.submit(DEMO_JOB.format(rounds=rounds, clients=num_institutions))
            console.print(f"submitted federated job {job.job_id}: {rounds} rounds of FedAvg")
            final = watch_job(remote, job.job_id, console)
            report(remote, final, console, work_dir)
        if final.state == jobs_pb2.JOB_STATE_SUCCEEDED:
            check_provenance(coordinator_dir, final.job_id, console)
        return int(final.state)
    finally:
        console.print("stopping every process the demo started...")
        for child in reversed(children):
            child.stop()
        console.print(f"logs: {work_dir / 'logs'}")


def check_provenance(data_dir: Path, job_id: str, console: Console) -> None:
    """What anyone holding the log and the public key can do: verify, then replay."""
    from coordinator.cli.provenance import job_records, load_verified
    from coordinator.replay import replay_rounds

    log, verified = load_verified(None, None, data_dir)
    head = verified.last_head
    console.print(
        f"provenance: {log} verifies: {verified.records} signed records, "
        f"{verified.signed_updates} institution-signed updates, tree size "
        f"{head.tree_size if head else 0}"
    )
    rounds = replay_rounds(data_dir, job_id, job_records(verified, job_id))
    console.print(
        f"replay: all {len(rounds)} rounds' aggregates reproduced bit for bit from the "
        "retained updates"
    )


def report(remote: Remote, job: jobs_pb2.Job, console: Console, work_dir: Path) -> None:
    rounds = remote.get(job.job_id).rounds
    if not rounds:
        console.print(f"[red]job {job.job_id} ended with no rounds: {job.message}[/]")
        return
    first, last = rounds[0], rounds[-1]
    accuracy = last.metrics.get("eval_accuracy", float("nan"))
    console.print(
        f"\njob {job.job_id}: {job.message}\n"
        f"held-out accuracy: {first.metrics.get('eval_accuracy', float('nan')):.3f} "
        f"(initial) -> [bold]{accuracy:.3f}[/] after round {last.round}"
    )
    if job.model_path:
        console.print(f"final model: {job.model_path}")
