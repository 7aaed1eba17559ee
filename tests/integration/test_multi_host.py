"""A consortium on three hosts, built by following docs/onboarding.md word for word.

The coordinator and two sites each get a Linux network namespace of their own, with
their own address, linked by a bridge (consortium/netns.py); `coordinator.example.org`
resolves to the coordinator's address at every host. Each host has its own file tree
(the guide's /srv, /var/lib and /data under a folder of its own). The test runs every
command block of the guide on the host it names (tests/guide.py), hands over what the
guide says to send, and checks what a person following it would: every command exits
0, both sites join (their Flower SuperNodes and Ray workers included) over the
namespaces' addresses, the first job completes and verifies, and a revoked site is
refused while the other carries on. A site's namespace has no route to the
coordinator's loopback, so nothing here can pass through 127.0.0.1 between hosts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from consortium.exit_codes import ExitCode
from consortium.netns import NetnsHost, NetworkTestbed
from consortium.processes import ChildProcess
from coordinator.data_dir import DataDir
from coordinator.state import SqliteStateStore
from coordinator.state.records import NodeState
from tests.conftest import Processes
from tests.guide import EXAMPLE_SITE, GUIDE, RunStep, SendStep, Step, for_site, read_steps
from tests.helpers import TEST_PROFILE, wait_for

SITES = (EXAMPLE_SITE, "mercy-clinic")
HOSTS = [
    NetnsHost("operator", "192.0.2.10", ("coordinator.example.org",)),
    NetnsHost(SITES[0], "192.0.2.21"),
    NetnsHost(SITES[1], "192.0.2.22"),
]
COMMAND_TIMEOUT_S = 300.0
# The guide's absolute paths, each host's own (under the host's folder here).
_HOST_PATH = re.compile(r"(?<![\w./-])/(srv|var/lib|data)/")
_EXPECTED_COMMANDS = (
    "coordinator init",
    "coordinator serve",
    "client keygen",
    "coordinator onboard",
    "client data check",
    "client join",
    "coordinator nodes",
    "coordinator jobs submit",
    "coordinator provenance verify",
    "coordinator revoke",
)


class Hosts:
    """Where each host keeps its files, and how a command of the guide runs there."""

    def __init__(self, root: Path, testbed: NetworkTestbed, processes: Processes) -> None:
        self.root = root
        self.testbed = testbed
        self.processes = processes
        self.servers: dict[str, ChildProcess] = {}
        self.outputs: list[tuple[str, str, str]] = []  # (host, script, output)

    def home(self, host: str) -> Path:
        path = self.root / host / "home"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def local(self, host: str, text: str) -> str:
        """The guide's text with its absolute paths moved under `host`'s folder."""
        return _HOST_PATH.sub(lambda m: f"{self.root / host}/{m.group(1)}/", text)

    def path(self, host: str, guide_path: str) -> Path:
        local = Path(self.local(host, guide_path))
        return local if local.is_absolute() else self.home(host) / local

    def run(self, host: str, script: str) -> str:
        argv = self.testbed.exec_argv(host, ["bash", "-euo", "pipefail", "-c", script])
        result = subprocess.run(
            argv,
            cwd=self.home(host),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            env={**os.environ, **TEST_PROFILE, "COLUMNS": "200", "PATH": _venv_path()},
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"on {host}, exit {result.returncode}:\n{script}\n{output}"
        self.outputs.append((host, script, output))
        return output

    def start(self, host: str, script: str) -> ChildProcess:
        command = f"cd {self.home(host)} && exec {script}"
        child = self.processes.start(
            f"{host}-{len(self.servers)}",
            *self.testbed.exec_argv(host, ["bash", "-c", command]),
            env=TEST_PROFILE,
        )
        self.servers[host] = child
        return child

    def send(self, step: SendStep, site: str) -> None:
        source_host = site if step.source_host == "site" else "operator"
        target_host = site if step.target_host == "site" else "operator"
        source = self.path(source_host, for_site(step.source, site))
        target = self.path(target_host, for_site(step.target, site))
        assert source.exists(), f"guide line {step.line}: {source} was not written"
        shutil.copytree(source, target, dirs_exist_ok=True)


def _venv_path() -> str:
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture
def testbed() -> Iterator[NetworkTestbed]:
    with NetworkTestbed(HOSTS) as bed:
        yield bed


def _node_state(data_dir: Path, institution: str) -> NodeState | None:
    store = SqliteStateStore(DataDir(data_dir).state_db)
    try:
        states = [n.state for n in store.list_nodes() if n.institution == institution]
    finally:
        store.close()
    return states[-1] if states else None


def _ready(hosts: Hosts, step: RunStep, host: str, site: str, data_dir: Path) -> None:
    """Wait until the server a background step started is up, as its user would."""
    server = hosts.servers[host]
    if step.script.startswith("coordinator serve"):
        wait_for(
            "coordinator serve to write its address",
            lambda: _alive(server) and DataDir(data_dir).address_file.exists(),
        )
    elif step.script.startswith("client join"):
        wait_for(
            f"{site} to be online",
            lambda: _alive(server) and _node_state(data_dir, site) == NodeState.ONLINE,
        )
        # ...and its Ray worker in the coordinator's cluster, as `coordinator nodes` says.
        wait_for(f"{site}'s Ray worker", lambda: _alive(server) and _in_ray(hosts, site))
    else:
        raise AssertionError(f"guide line {step.line}: no readiness known for {step.script!r}")


# A listener that exits between the listing and the look at its process (a replaced
# Ray head's) is gone, so not exposed: skipped, not a crash of the listing.
_LISTENERS = """
import psutil
for c in psutil.net_connections("tcp"):
    if c.status == psutil.CONN_LISTEN and not c.laddr.ip.startswith(("127.", "::1")):
        try:
            command = " ".join(psutil.Process(c.pid).cmdline())[:200] if c.pid else "?"
        except psutil.NoSuchProcess:
            continue
        print(c.laddr.port, command)
"""


def _exposed_ports(testbed: NetworkTestbed, host: str) -> dict[int, str]:
    """The TCP ports something listens on at `host` on an address other hosts reach,
    with the command line of what listens."""
    argv = testbed.exec_argv(host, [sys.executable, "-c", _LISTENERS])
    listed = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30)
    return {
        int(port): command
        for port, _, command in (line.partition(" ") for line in listed.stdout.splitlines())
    }


def _in_ray(hosts: Hosts, site: str) -> bool:
    data_dir = hosts.local("operator", "/srv/consortium")
    nodes = hosts.run("operator", f"coordinator nodes --data-dir {data_dir}")
    return any(site in line and "ALIVE" in line for line in nodes.splitlines())


def _ports_once(
    testbed: NetworkTestbed, host: str, ready: Callable[[dict[int, str]], bool], what: str
) -> dict[int, str]:
    """The first listing of `host`'s exposed ports that is `ready`: one snapshot, judged
    whole, not a wait on one listing and a check on the next."""
    seen: list[dict[int, str]] = []

    def listed() -> bool:
        seen.append(_exposed_ports(testbed, host))
        return ready(seen[-1])

    wait_for(f"{host}: {what}", listed)
    return seen[-1]


def _alive(child: ChildProcess) -> bool:
    code = child.poll()
    assert code is None, f"{child.name} exited with {code}:\n{child.log_tail()}"
    return True


def _run_guide(hosts: Hosts, steps: list[Step], data_dir: Path) -> dict[str, list[str]]:
    """Every step in order; per-site steps once per site. Returns outputs by command."""
    outputs: dict[str, list[str]] = {}
    for step in steps:
        sites = SITES[:1] if isinstance(step, RunStep) and step.first_site_only else SITES
        for site in sites if step.per_site else SITES[:1]:
            if isinstance(step, SendStep):
                hosts.send(step, site)
                continue
            host = site if step.host == "site" else "operator"
            script = hosts.local(
                host, for_site(step.script, site) if step.per_site else step.script
            )
            if step.background:
                hosts.start(host, script)
                _ready(hosts, step, host, site, data_dir)
            else:
                outputs.setdefault(step.script.split("\n")[0], []).append(hosts.run(host, script))
    return outputs


def test_the_onboarding_guide_builds_a_consortium_across_three_hosts(
    tmp_path: Path, testbed: NetworkTestbed, processes: Processes
) -> None:
    steps = read_steps(GUIDE.read_text())
    scripts = "\n".join(step.script for step in steps if isinstance(step, RunStep))
    for command in _EXPECTED_COMMANDS:  # the guide cannot drop a step unnoticed
        assert command in scripts, f"docs/onboarding.md no longer runs {command!r}"
    hosts = Hosts(tmp_path, testbed, processes)
    data_dir = Path(hosts.local("operator", "/srv/consortium"))

    outputs = _run_guide(hosts, steps, data_dir)

    nodes = outputs["coordinator nodes --data-dir /srv/consortium"][0]
    for site in SITES:
        row = next(line for line in nodes.splitlines() if site in line)
        assert "online" in row, nodes
        assert "ALIVE" in row, f"{site}'s Ray worker did not join the head:\n{nodes}"
    job = outputs["cat > first-job.toml <<'EOF'"][0]
    assert "3/3 succeeded" in job, job
    for round_ in (1, 2, 3):  # both sites took part in every round
        assert f"round {round_}, 2 participants" in job, job
    assert "\nOK " in job and "6 institution-signed updates" in job, job
    # Reachable from other hosts: only the ports the guide names (docs/operations.md,
    # "Ports and directions"); everything else listens on loopback.
    ray_range = set(range(20000, 20100))
    expected = {50051, 9093, 6379}
    # The guide's last step revoked a site, so the coordinator replaces its Ray head
    # (a new cluster token) at a moment of its own choosing: its GCS port (6379) is
    # missing while it restarts. Judge one listing taken while every named port listens.
    coordinator_ports = _ports_once(
        testbed, "operator", lambda ports: expected <= ports.keys(), "its named ports"
    )
    assert coordinator_ports.keys() - ray_range == expected, coordinator_ports
    site_ports = _ports_once(testbed, SITES[1], bool, "its Ray node's ports (on the new head)")
    assert site_ports and site_ports.keys() <= ray_range, site_ports  # its Ray node's
    # The revoked site is refused on the control plane and ends with the documented
    # exit code and a reason; the other site carries on.
    revoked = hosts.servers[SITES[0]]
    wait_for(f"{SITES[0]}'s client join to end", lambda: revoked.poll() is not None)
    assert revoked.poll() == ExitCode.UNAUTHENTICATED, revoked.log_tail()
    assert "has been revoked" in revoked.log_tail(), revoked.log_tail()
    assert hosts.servers[SITES[1]].poll() is None
    assert _node_state(data_dir, SITES[1]) == NodeState.ONLINE
    assert _node_state(data_dir, SITES[0]) == NodeState.GONE

    processes.stop_all()
    deadline = time.monotonic() + 15
    while processes.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes.alive() == [], "processes left behind"
