"""Sites execute only runs the coordinator signed for (issue 13, item 2).

The attacker here is stronger than an outsider: someone on the coordinator host who can
reach the SuperLink's loopback Control API (a local user, or a stolen shell) and starts
a Flower run of an app of their own with `flwr run`. Its ClientApp would write a file
into each site's state dir. Against a real mutual-TLS `coordinator serve` with two
joined institutions, each site refuses the run: no code of it runs there, the rogue
ServerApp receives an error reply naming the refusal, and each site logs the run's id
and counts the refusal (`consortium_site_refused_runs_total{reason="unapproved"}`).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from consortium.processes import venv_executable
from coordinator.access.pki_files import CoordinatorPki
from coordinator.data_dir import DataDir
from coordinator.demo import write_partitions
from tests.conftest import Processes
from tests.helpers import local_consortium, metric_value, wait_for

NAMES = ("alpha", "beta")
ROGUE_MODULE = "rogue_attack_app"
ROGUE_PYPROJECT = f"""\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "rogue"
version = "1.0.0"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "{ROGUE_MODULE}:server"
clientapp = "{ROGUE_MODULE}:client"

[tool.flwr.app.config]
report = ""
"""
# The rogue app: its ClientApp leaves a mark at the site; its ServerApp writes down
# what each site answered.
ROGUE_APP = """\
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    Path(str(context.node_config["state-dir"]), "ROGUE-CODE-RAN").write_text("x")
    return Message(RecordDict(), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    nodes = []
    for _ in range(60):
        nodes = list(grid.get_node_ids())
        if len(nodes) >= 2:
            break
        time.sleep(1)
    content = RecordDict({"config": ConfigRecord({"probe": 1})})
    messages = [Message(content, dst_node_id=node, message_type="train") for node in nodes]
    replies = grid.send_and_receive(messages, timeout=120)
    report = [
        {"error": reply.error.reason if reply.has_error() else None} for reply in replies
    ]
    Path(str(context.run_config["report"])).write_text(json.dumps(report))
"""


@dataclass
class Sites:
    root: Path
    data_dir: Path
    state_dirs: dict[str, Path]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    root = tmp_path_factory.mktemp("site-approval")
    processes = Processes(root / "logs")
    try:
        consortium = local_consortium(processes, root)
        consortium.init()
        consortium.serve()
        for name in NAMES:
            consortium.onboard(name)
        consortium.wait_for_supernode_keys()
        for name, data in zip(NAMES, write_partitions(root, list(NAMES)), strict=True):
            consortium.join(name, data)
        consortium.wait_for_online(len(NAMES))
        yield Sites(root, consortium.data_dir, {n: consortium.state_dir(n) for n in NAMES})
    finally:
        processes.stop_all()


def start_rogue_run(sites: Sites, work: Path) -> tuple[str, Path]:
    """`flwr run` of the rogue app against the SuperLink's Control API, holding only
    what anyone on the host can read (its address and the public CA certificate)."""
    app = work / "app"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(ROGUE_PYPROJECT)
    (app / f"{ROGUE_MODULE}.py").write_text(ROGUE_APP)
    home = work / "flwr-home"
    home.mkdir()
    superlink = DataDir(sites.data_dir).superlink_port_file.read_text().strip()
    ca_cert = CoordinatorPki(sites.data_dir).ca_cert
    (home / "config.toml").write_text(
        f'[superlink.target]\naddress = "127.0.0.1:{superlink}"\nroot-certificates = "{ca_cert}"\n'
    )
    report = work / "report.json"
    done = subprocess.run(
        [
            venv_executable("flwr"),
            "run",
            str(app),
            "target",
            "--run-config",
            f"report={json.dumps(str(report))}",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, FLWR_HOME=str(home)),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return str(json.loads(done.stdout)["run-id"]), report


def test_a_run_the_coordinator_did_not_approve_runs_nowhere(sites: Sites, tmp_path: Path) -> None:
    run_id, report = start_rogue_run(sites, tmp_path)
    wait_for("the rogue ServerApp's report of the sites' replies", report.exists, 240)
    replies = json.loads(report.read_text())
    assert len(replies) == len(NAMES), replies
    for reply in replies:
        assert reply["error"] is not None, "a site executed the rogue run"
        assert f"refused run {run_id}" in reply["error"]
        assert "approved no Flower run" in reply["error"]
    for name in NAMES:
        state = sites.state_dirs[name]
        assert not (state / "ROGUE-CODE-RAN").exists(), f"the rogue ClientApp ran at {name}"
        refused = metric_value(
            state,
            "consortium_site_refused_runs_total",
            {"institution": name, "reason": "unapproved"},
        )
        assert refused >= 1
        log = (sites.root / "logs" / f"client-{name}.log").read_text()
        assert f"refused Flower run {run_id} (unapproved)" in log
