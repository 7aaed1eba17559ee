"""Attacks through Flower against a real mutual-TLS `coordinator serve` with three
joined institutions (issue 13, items 2 and 5), sharing one consortium and one job.

Runs nobody approved. The attacker is on the coordinator host and can reach the
SuperLink's loopback Control API (a local user, or a stolen shell) and starts a Flower
run of an app of their own with `flwr run`; its ClientApp would write a file into each
site's state dir.
* The coordinator starts no ServerApp for the run: it is refused, logged with its run
  id, counted (`consortium_auth_refusals_total{channel="flower_run"}`) and stopped.
* An attacker who can also take the run's ServerApp task from the SuperLink (it holds
  the launcher's secret, not the coordinator's signing key) and starts the ServerApp
  themselves still gets nothing executed at any site: each site refuses the run with
  an error reply, logs the run id and counts
  `consortium_site_refused_runs_total{reason="unapproved"}`.

Dishonest members. Alpha runs the installed client; beta and gamma run a modified one
(`modified_client.py`) whose replies their own keys sign. Beta reports a NaN training
loss (it used to make the ServerApp raise while logging the round, failing the job);
gamma claims 100000 examples against the few hundred it declared when it joined (it
used to take over 99% of the round's weight); alpha also tries to run a second node
with copies of its keys. Each dishonest update is refused with its reason in the
round's provenance record, logged with the institution's name and counted; the job
completes on alpha's updates alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import (
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.runtime import RuntimeHttpClient

from consortium.processes import ChildProcess, venv_executable
from consortium.proto.v1 import jobs_pb2
from consortium.provenance.log import read_lines
from consortium.provenance.records import Round, parse_record
from coordinator.access.pki_files import CoordinatorPki
from coordinator.data_dir import DataDir
from coordinator.demo import write_partitions
from coordinator.local_consortium import LocalConsortium
from tests.conftest import Processes
from tests.helpers import auth_refusals, local_consortium, metric_value, run_to_end, wait_for
from tests.security.modified_client import ATTACK_ENV, INFLATED_COUNT, NAN_LOSS

# The attacker waits this long for a rogue run's ServerApp task to be offered (each
# appears within one of the launcher's polls; the suite runs three workers on two cores).
TAKE_TASK_TIMEOUT_S = 60.0
ATTACKS = {"alpha": None, "beta": NAN_LOSS, "gamma": INFLATED_COUNT}
NAMES = tuple(ATTACKS)
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


# All three sites are online before it is submitted, so every round is sent to all of
# them; min_clients is the number of accepted updates a round needs (docs/aggregation.md),
# and only alpha's are accepted. (With min_clients = 3 the job fails at round 1, naming
# beta's and gamma's refusals.)
APPROVED_JOB = """\
name = "approved"
model = "digits-cnn"
dataset = "digits"
rounds = 2
min_clients = 1
local_epochs = 1
"""


@dataclass
class Sites:
    root: Path
    data_dir: Path
    state_dirs: dict[str, Path]
    approved_job: jobs_pb2.Job  # a job the coordinator ran before the rogue runs
    commands: set[tuple[str, ...]]  # the argv of every process seen during it
    rounds: list[Round]  # its round records
    twin_exit_code: int | None  # alpha's second node
    twin_supernode_log: str


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    root = tmp_path_factory.mktemp("flower-attacks")
    processes = Processes(root / "logs")
    try:
        consortium = local_consortium(processes, root)
        consortium.init()
        consortium.serve()
        for name in NAMES:
            consortium.onboard(name)
        consortium.wait_for_supernode_keys()
        partitions = write_partitions(root, list(NAMES))
        for (name, attack), data in zip(ATTACKS.items(), partitions, strict=True):
            if attack is None:
                consortium.join(name, data)
            else:
                join_modified(consortium, name, data, attack)
        consortium.wait_for_online(len(NAMES))
        twin, twin_state = start_twin(consortium, root, partitions[0])
        wait_for("alpha's second node to give up", lambda: twin.poll() is not None, 120)
        with consortium.connect() as remote:
            final = run_to_end(remote, APPROVED_JOB, processes)
        entries = [json.loads(line) for line in read_lines(consortium.paths.provenance_log)]
        records = [parse_record(e) for e in entries if e.get("type") == "round"]
        yield Sites(
            root,
            consortium.data_dir,
            {n: consortium.state_dir(n) for n in NAMES},
            final,
            set(processes.seen_commands),
            [r for r in records if isinstance(r, Round)],
            twin.poll(),
            (twin_state / "supernode.log").read_text(errors="replace"),
        )
    finally:
        processes.stop_all()


def join_modified(consortium: LocalConsortium, name: str, data: Path, attack: str) -> None:
    """`client join` with the member's modified ClientApp."""
    consortium.start(
        f"client-{name}",
        "python",
        "-m",
        "tests.security.modified_client",
        "join",
        "--bundle",
        str(consortium.bundle_dir(name)),
        "--data",
        str(data),
        "--state-dir",
        str(consortium.state_dir(name)),
        "--no-ray",
        env={ATTACK_ENV: attack},
    )


def start_twin(consortium: LocalConsortium, root: Path, data: Path) -> tuple[ChildProcess, Path]:
    """A second node of alpha's, from a copy of its state dir (same keys), in the hope
    of two updates per round."""
    twin_state = root / "alpha-twin-state"
    shutil.copytree(consortium.state_dir("alpha"), twin_state)
    twin = consortium.start(
        "client-alpha-twin",
        "client",
        "join",
        "--bundle",
        str(consortium.bundle_dir("alpha")),
        "--data",
        str(data),
        "--state-dir",
        str(twin_state),
        "--no-ray",
    )
    return twin, twin_state


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


def test_an_approved_run_executes_with_no_task_token_in_any_argv(sites: Sites) -> None:
    """The positive control, and the local-exposure check: the coordinator's launcher
    gives the ServerApp its token in a 0600 file, sites run their installed ClientApp
    inside `client join` (no `flwr-clientapp` process), so `ps` shows no token."""
    assert sites.approved_job.state == jobs_pb2.JOB_STATE_SUCCEEDED, sites.approved_job.message
    commands = sites.commands
    assert not [argv for argv in commands if "--token" in argv]
    serverapps = [argv for argv in commands if any("flwr-serverapp" in a for a in argv)]
    assert serverapps and all("--token-file" in argv for argv in serverapps)
    assert not [argv for argv in commands if any("flwr-clientapp" in a for a in argv)]


def flower_status(sites: Sites, home: Path, run_id: str) -> str:
    done = subprocess.run(
        [venv_executable("flwr"), "ls", "target", "--run-id", run_id, "--format", "json"],
        capture_output=True,
        text=True,
        env=dict(os.environ, FLWR_HOME=str(home)),
        timeout=60,
        check=False,
    )
    runs = json.loads(done.stdout).get("runs") or [{}]
    return str(runs[0].get("status", ""))


def take_serverapp_task(sites: Sites, run_ids: Collection[str]) -> tuple[str, str]:
    """AcquireTask with the launcher's secret, as the coordinator's account could: the
    run id and token of the first ServerApp task of `run_ids` the SuperLink offers."""
    paths = DataDir(sites.data_dir)
    client = RuntimeHttpClient.from_server_address(
        server_address=f"127.0.0.1:{paths.superlink_port_file.read_text().strip()}",
        insecure=False,
        root_certificates=CoordinatorPki(sites.data_dir).ca_cert.read_bytes(),
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(
                master_secret=paths.superexec_secret.read_bytes(),
                protected_methods={"/flwr.proto.Runtime/AcquireTask"},
            ),
        ],
    )
    deadline = time.monotonic() + TAKE_TASK_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            acquired = client.AcquireTask(
                AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP.value])
            )
            if acquired.HasField("task") and str(acquired.task.run_id) in run_ids:
                return str(acquired.task.run_id), str(acquired.token)
            time.sleep(0.1)
    finally:
        client.close()
    raise AssertionError(f"no ServerApp task of runs {sorted(run_ids)} was offered")


def test_the_coordinator_starts_no_serverapp_for_a_run_it_did_not_approve(
    sites: Sites, tmp_path: Path
) -> None:
    before = auth_refusals(sites.data_dir, "flower_run", "unapproved")
    run_id, report = start_rogue_run(sites, tmp_path)
    log = sites.root / "logs" / "coordinator.log"
    wait_for(
        "the coordinator to refuse the rogue run",
        lambda: f"ServerApp of Flower run {run_id} (unapproved)" in log.read_text(),
        60,
    )
    assert auth_refusals(sites.data_dir, "flower_run", "unapproved") == before + 1
    home = tmp_path / "flwr-home"
    wait_for(
        "the rogue run to be stopped",
        lambda: flower_status(sites, home, run_id).startswith("finished"),
        60,
    )
    assert not report.exists()  # its ServerApp never ran
    assert not any((state / "ROGUE-CODE-RAN").exists() for state in sites.state_dirs.values())


def test_sites_refuse_a_run_whose_serverapp_someone_else_started(
    sites: Sites, tmp_path: Path
) -> None:
    # Two rogue runs: the launcher holds the task of the one it takes while it waits
    # for an approval that never comes (or, between its polls, takes neither yet), so
    # the attacker gets the other's task, whichever the SuperLink offers it first.
    reports = dict(start_rogue_run(sites, tmp_path / work) for work in ("first", "second"))
    run_id, token = take_serverapp_task(sites, reports)
    report = reports[run_id]
    token_file = tmp_path / "token"
    token_file.write_text(token)
    paths = DataDir(sites.data_dir)
    serverapp = subprocess.Popen(
        [
            venv_executable("flwr-serverapp"),
            "--runtime-api-address",
            f"127.0.0.1:{paths.superlink_port_file.read_text().strip()}",
            "--token-file",
            str(token_file),
            "--root-certificates",
            str(CoordinatorPki(sites.data_dir).ca_cert),
        ],
        env=dict(os.environ, FLWR_HOME=str(tmp_path / "attacker-home")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for("the rogue ServerApp's report of the sites' replies", report.exists, 240)
    finally:
        serverapp.kill()
        serverapp.wait()
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


# --- dishonest members ----------------------------------------------------------


def test_the_job_completes_on_the_honest_institutions_updates(sites: Sites) -> None:
    assert sites.approved_job.state == jobs_pb2.JOB_STATE_SUCCEEDED, sites.approved_job.message
    assert [r.round for r in sites.rounds] == [1, 2]
    for round_ in sites.rounds:
        accepted = [u.institution for u in round_.updates if u.accepted]
        assert accepted == ["alpha"], round_.updates


def test_a_second_node_of_one_institution_cannot_join_flower(sites: Sites) -> None:
    """One update per institution per round: Flower activates one node per registered
    SuperNode key (one per institution, kept so by the coordinator's key sync), and the
    ServerApp refuses a second update of an institution in a round (`duplicate`, proven
    in tests/unit/test_update_admission.py)."""
    assert sites.twin_exit_code not in (None, 0)
    assert "Failed to activate SuperNode" in sites.twin_supernode_log
    for round_ in sites.rounds:
        assert [u.institution for u in round_.updates].count("alpha") == 1


@pytest.mark.parametrize(
    ("institution", "reason"), [("beta", "bad_metrics"), ("gamma", "inflated_count")]
)
def test_each_dishonest_update_is_refused_recorded_logged_and_counted(
    sites: Sites, institution: str, reason: str
) -> None:
    for round_ in sites.rounds:
        (update,) = [u for u in round_.updates if u.institution == institution]
        assert not update.accepted
        assert update.reason == reason
    log = DataDir(sites.data_dir).log_file("superlink").read_text(errors="replace")
    assert f"({institution}): {reason}" in log
    rejected = metric_value(sites.data_dir, "consortium_updates_rejected_total", {"reason": reason})
    assert rejected == len(sites.rounds)
