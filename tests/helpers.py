"""Helpers the tests share, all built on `coordinator.local_consortium.LocalConsortium`.

Test modules import shared helpers from here (and fixtures from the conftest files),
never from each other or from `coordinator.demo`.

Every consortium a test starts gets `TEST_PROFILE`: short scheduler and heartbeat
intervals and a short Ray drain, given as the environment variables the settings read
(TOML < CONSORTIUM_* environment < flags), so no test monkeypatches a constant.
Ray is off unless a test asks for it (`ray=True`): a Ray head and one worker per site
cost seconds to start and to stop, and most tests are not about Ray.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from consortium.processes import ChildProcess, venv_executable
from consortium.proto.v1 import jobs_pb2, nodes_pb2
from coordinator.cli.remote import Remote
from coordinator.data_dir import DataDir
from coordinator.demo import write_partitions, write_text_partitions
from coordinator.local_consortium import LocalConsortium, online_nodes, supernode_keys_registered
from tests.conftest import Processes

__all__ = [
    "FEDERATED_PRETRAIN",
    "FINAL_STATES",
    "START_TIMEOUT_S",
    "TEST_PROFILE",
    "TINY_PRETRAIN",
    "CompletedRun",
    "auth_refusals",
    "join_site",
    "local_consortium",
    "metric_value",
    "online_nodes",
    "run_cli",
    "start_coordinator",
    "start_secure_consortium",
    "supernode_keys_registered",
    "wait_for",
    "wait_for_log",
    "write_partitions",
    "write_text_partitions",
]

START_TIMEOUT_S = 120.0

# The fast settings profile of every process a test starts (see the module docstring).
# Shorter than the defaults where a test waits on the interval, but not shorter than
# needed: an idle consortium's polls are a tax on every second of the suite, and CI runs
# two consortia at once on two cores. Measured on a secure coordinator with two sites,
# idle: 14.6% of a core with heartbeats every 0.5 s, the scheduler every 0.2 s and
# SuperNode pulls every 0.5 s (each pull crosses the site's forwarder, the coordinator's
# Fleet edge and the SuperLink); 11.3% with the values below. A node is still taken
# for offline after node_timeout_s (10 s), whatever the heartbeat interval.
TEST_PROFILE = {
    "CONSORTIUM_COORDINATOR_SCHEDULER_POLL_INTERVAL_S": "0.5",
    "CONSORTIUM_COORDINATOR_HEARTBEAT_INTERVAL_S": "1.0",
    "CONSORTIUM_CLIENT_RAY_DRAIN_TIMEOUT_S": "1.0",
    # The shortest Flower's SuperLink accepts: a killed SuperNode's old node is taken
    # for gone after 20 s instead of 60 (a plain-text site gets a new node id).
    "CONSORTIUM_CLIENT_SUPERNODE_HEARTBEAT_INTERVAL_S": "10",
    # Every pull is an authenticated request the SuperLink answers with SQL (the
    # default, 0.2 s, kept a SuperLink at a tenth of a core with two busy sites); the
    # site's task runner asks its SuperNode as often. Rounds wait a little longer.
    "CONSORTIUM_CLIENT_SUPERNODE_POLL_INTERVAL_S": "1.0",
    # Most of the suite's sites never get a task: they leave torch unloaded (1.4 s of
    # CPU each). tests/integration/conftest.py's sites, which train, preload it.
    "CONSORTIUM_CLIENT_PRELOAD_CLIENT_APP": "false",
}

FINAL_STATES = (
    jobs_pb2.JOB_STATE_SUCCEEDED,
    jobs_pb2.JOB_STATE_FAILED,
    jobs_pb2.JOB_STATE_CANCELLED,
)


@dataclass
class CompletedRun:
    """What the session's federated job left behind (tests/integration/conftest.py)."""

    data_dir: Path
    job: jobs_pb2.Job
    rounds: list[jobs_pb2.RoundMetrics]
    nodes_after_leave: list[nodes_pb2.Node]
    leftover_pids: list[int]
    pretrain_job: jobs_pb2.Job  # a federated pretraining job on the same sites, after it
    pretrain_rounds: list[jobs_pb2.RoundMetrics]
    site_logs: list[str]  # each site's `client join` log


# The smallest pretraining job worth running: one 32-wide layer on 32 KiB of the corpus,
# on the Ray pool (FEDERATED_PRETRAIN: the same job at the sites, over Flower).
TINY_PRETRAIN = """\
kind = "pretrain"
placement = "ray-pool"
n_layer = 1
n_head = 2
n_embd = 32
block_size = 32
seq_len = 32
batch_size = 4
num_shards = 2
corpus_bytes = 32768
validation_bytes = 4096
eval_batches = 2
"""
FEDERATED_PRETRAIN = TINY_PRETRAIN.replace('placement = "ray-pool"', 'placement = "federated"')


LOG_TIMEOUT_S = 30.0


def wait_for(what: str, ready: Callable[[], bool], timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def wait_for_log(read: Callable[[], str], text: str, timeout_s: float = LOG_TIMEOUT_S) -> None:
    """Wait for `text` in a log `read` returns. A coordinator's own lines reach its log
    file through its stderr tee (a pipe drained by a thread: coordinator/access/refusals/
    control_plane.py), so a line logged as a call fails may land just after the caller
    sees the failure; on a loaded machine, measurably later."""
    wait_for(f"{text!r} in the log", lambda: text in read(), timeout_s)


def run_to_end(remote: Remote, spec: str, processes: Processes) -> jobs_pb2.Job:
    """Submit `spec` and watch it to its final state; every watch event also records
    the processes' descendants (Flower's helpers), so a test can check they end."""
    job = remote.submit(spec)
    final = None
    for event in remote.watch(job.job_id):
        processes.remember_descendants()
        if event.HasField("job") and event.job.state in FINAL_STATES:
            final = event.job
    assert final is not None, "the watch stream ended before the job did"
    return final


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A `coordinator`/`client` command of this venv, run to its end."""
    return subprocess.run(
        [venv_executable(argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        check=False,
    )


def local_consortium(
    processes: Processes,
    root: Path,
    *,
    secure: bool = True,
    ray: bool = False,
    data_dir: Path | None = None,
    preload_client_app: bool = False,
) -> LocalConsortium:
    """A `LocalConsortium` under `root` whose children `processes` starts and stops
    (it remembers their descendants, so tests can check that none is left)."""
    preload = {"CONSORTIUM_CLIENT_PRELOAD_CLIENT_APP": str(preload_client_app).lower()}
    return LocalConsortium(
        root,
        secure=secure,
        ray=ray,
        env={**TEST_PROFILE, **preload},
        launcher=processes,
        data_dir=data_dir,
        sites_dir=root,  # root/<name>/{state,bundle}
        start_timeout_s=START_TIMEOUT_S,
    )


def start_coordinator(
    processes: Processes,
    data_dir: Path,
    name: str = "coordinator",
    secure: bool = False,
    flags: Sequence[str] = (),
    *,
    ray: bool = False,
) -> str:
    """`coordinator serve` on loopback (mutual TLS when `secure`, which needs
    `coordinator init` first; else --insecure), with extra `flags`; returns its API
    address once ready."""
    consortium = local_consortium(
        processes, data_dir.parent, secure=secure, ray=ray, data_dir=data_dir
    )
    try:
        return consortium.serve(name, flags)
    except Exception as error:
        raise AssertionError(f"coordinator did not start: {error}") from error


def join_site(
    processes: Processes,
    name: str,
    data: Path,
    state_dir: Path,
    *,
    bundle: Path | None = None,
    coordinator: str | None = None,
    institution: str | None = None,
    ray: bool = False,
) -> ChildProcess:
    """`client join` with an onboarding bundle (mutual TLS), or, given `coordinator`
    and `institution` instead, with --insecure; --ray if `ray`, else --no-ray."""
    if bundle is not None:
        credentials = ["--bundle", str(bundle)]
    else:
        assert coordinator is not None and institution is not None
        credentials = ["--insecure", "--coordinator", coordinator, "--institution", institution]
    flags = ["--ray"] if ray else ["--no-ray"]
    return processes.start(
        name,
        "client",
        "join",
        *credentials,
        "--data",
        str(data),
        "--state-dir",
        str(state_dir),
        *flags,
        env=TEST_PROFILE,
    )


def start_secure_consortium(
    processes: Processes,
    root: Path,
    names: Iterable[str],
    *,
    wait_for_keys: bool = True,
    flags: Sequence[str] = (),
    ray: bool = False,
) -> tuple[Path, str]:
    """`coordinator init`, a mutual-TLS `coordinator serve`, and each institution
    onboarded from site-held keys (bundle in root/<name>/bundle); returns
    the data dir and the API address, once the SuperLink knows the sites' keys (unless
    told not to wait)."""
    consortium = local_consortium(processes, root, ray=ray)
    consortium.init()
    address = consortium.serve(flags=flags)
    for name in names:
        consortium.onboard(name)
    if wait_for_keys:
        wait_for("SuperNode keys registered", consortium.supernode_keys_registered)
    return consortium.data_dir, address


def metric_value(data_dir: Path, name: str, labels: dict[str, str]) -> float:
    """One sample of the coordinator's /metrics (its address is in the data dir)."""
    address = DataDir(data_dir).metrics_address_file.read_text().strip()
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"the coordinator exports no {name}{labels}")


def auth_refusals(data_dir: Path, channel: str, reason: str) -> float:
    """consortium_auth_refusals_total{channel, reason}, scraped from the coordinator."""
    return metric_value(
        data_dir, "consortium_auth_refusals_total", {"channel": channel, "reason": reason}
    )
