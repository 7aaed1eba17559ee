"""`coordinator demo` as the README runs it (smaller), and the pipeline it runs.

The demo brings the whole consortium up as deployed (onboarded institutions over mutual
TLS, no Ray: federated pretraining needs none), pretrains at the sites over the
federated channel, fine-tunes the result federatedly on each site's own text starting
from the pretrained model's signed digest, verifies and replays, and stops every process
it started. One run serves every test here: the pipeline's checks read what it left in
its data dir, and those that need a live coordinator restart one on that data dir
(without Ray or sites: they only submit and read).

Run as root (as CI runs), it is `coordinator demo --wan`: the same pipeline with the
coordinator and each site in a network namespace of its own, linked through a shaped
bridge (coordinator/wan.py). The coordinator then binds only its test-bed address,
which no process outside the test bed can reach, so a site that joined at all joined
across the test bed. One demo run covers both: the pipeline is the same code, and the
plain demo's loopback start-up is what every other consortium in the suite uses. On a
kernel without sch_netem (CI's) the links' delay and loss come from the test bed's
userspace switch (consortium/wan_switch.py), and the demo says so.
Elsewhere it runs on loopback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from consortium.errors import InvalidArgumentError
from consortium.proto.v1 import jobs_pb2
from consortium.provenance.environment import source_digest_of_archive
from consortium.provenance.signing import SigningKey
from consortium.provenance.verify import verify_log
from coordinator.cli.remote import Remote, connect
from coordinator.data_dir import DataDir
from coordinator.wan import COORDINATOR_ADDRESS
from tests.conftest import Processes
from tests.helpers import TEST_PROFILE, local_consortium, run_cli, wait_for

DEMO_TIMEOUT_S = 600.0
STANDALONE_VERIFIER = Path(__file__).parents[1] / "standalone" / "verify_attestation.py"
INSTITUTIONS = 2
ROUNDS = 1
OUTER_STEPS = 2  # the README's demo runs 4 of 30 inner steps; the checks need fewer
INNER_STEPS = 15
# Network namespaces need root; the test bed's checks run where it could be built.
BEHIND_WAN = os.geteuid() == 0


@dataclass
class DemoRun:
    work_dir: Path
    output: str  # the demo's console output, whitespace collapsed (rich wraps lines)
    returncode: int | None
    leftover_pids: list[int]

    @property
    def data_dir(self) -> Path:
        return self.work_dir / "coordinator"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    root = tmp_path_factory.mktemp("demo")
    processes = Processes(root / "logs")
    try:
        child = processes.start(
            "demo",
            "coordinator",
            "demo",
            *(["--wan"] if BEHIND_WAN else []),
            "--work-dir",
            str(root / "demo"),
            "--institutions",
            str(INSTITUTIONS),
            "--rounds",
            str(ROUNDS),
            "--outer-steps",
            str(OUTER_STEPS),
            "--inner-steps",
            str(INNER_STEPS),
            env=TEST_PROFILE,  # inherited by every process the demo starts
        )
        deadline = time.monotonic() + DEMO_TIMEOUT_S
        while child.poll() is None and time.monotonic() < deadline:
            processes.remember_descendants()
            time.sleep(1.0)
        returncode = child.poll()
        output = child.log_path.read_text()
    finally:
        processes.stop_all()
    assert returncode == 0, output[-3000:]
    # Killed processes can take a moment to leave the process table.
    wait_for("every process the demo started to end", lambda: processes.alive() == [], 15.0)
    return DemoRun(root / "demo", " ".join(output.split()), returncode, processes.alive())


@pytest.fixture(scope="module")
def restarted(demo: DemoRun) -> Iterator[Remote]:
    """A `coordinator serve` on the demo's data dir, for what needs a live API."""
    processes = Processes(demo.work_dir / "restart-logs")
    try:
        consortium = local_consortium(processes, demo.work_dir, data_dir=demo.data_dir, secure=True)
        address = consortium.serve("restarted")
        with connect(address, demo.data_dir) as remote:
            yield remote
    finally:
        processes.stop_all()


def test_demo_pretrains_fine_tunes_verifies_replays_and_cleans_up(demo: DemoRun) -> None:
    text = demo.output
    assert "pretraining job" in text
    assert f"on {INSTITUTIONS} contributed sites (placement = federated)" in text
    before, after = (
        float(x)
        for x in re.findall(r"held-out perplexity: ([\d.]+) \(before\) -> ([\d.]+)", text)[0]
    )
    assert after < before
    assert f"{OUTER_STEPS} DiLoCo outer steps of {INNER_STEPS} inner steps" in text
    assert f"replay OK: {OUTER_STEPS} outer step(s) reproduced bit for bit" in text
    assert f"all {ROUNDS} rounds' aggregates reproduced bit for bit" in text
    assert demo.leftover_pids == []


def _namespaces() -> str:
    return subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout


def test_the_sites_joined_where_the_demo_put_them(demo: DemoRun) -> None:
    """Behind the WAN (as root): across the test bed, to the coordinator's test-bed
    address, the only one it bound; the test bed is gone afterwards. Otherwise: on
    loopback."""
    bundle = demo.work_dir / "institutions" / "aurora-hospital" / "bundle" / "bundle.toml"
    if BEHIND_WAN:
        assert "every site in its own network namespace" in demo.output
        assert f'"{COORDINATOR_ADDRESS}:' in bundle.read_text()
        assert "-aurora-hospital" not in _namespaces()
    else:
        assert "network namespace" not in demo.output
        assert '"127.0.0.1:' in bundle.read_text()


def log_bodies(data_dir: Path, type_: str, job_id: str | None = None) -> list[dict[str, Any]]:
    entries = [
        json.loads(line) for line in DataDir(data_dir).provenance_log.read_text().splitlines()
    ]
    return [
        e["body"]
        for e in entries
        if e.get("type") == type_ and job_id in (None, e["body"].get("job_id"))
    ]


def job_ids(demo: DemoRun) -> tuple[str, str]:
    """(the pretraining job, the fine-tune), from their signed start records."""
    started = log_bodies(demo.data_dir, "job_started")
    kinds = {body.get("kind", "federated"): body["job_id"] for body in started}
    return kinds["pretrain"], kinds["federated"]


def test_the_demo_pretrains_at_each_sites_own_node(demo: DemoRun) -> None:
    """By default every outer step is computed by the institutions' sites, over the
    federated channel: one worker per site, named for its onboarded institution."""
    pretrain, _ = job_ids(demo)
    steps = log_bodies(demo.data_dir, "outer_step", pretrain)
    assert len(steps) == OUTER_STEPS
    for step in steps:
        workers = sorted(w["worker"] for w in step["workers"])
        assert len(workers) == INSTITUTIONS
        assert all(w.split("/", 1)[1].startswith("site-") for w in workers)
        assert len({w["institution"] for w in step["workers"]}) == INSTITUTIONS


def test_fine_tune_starts_from_the_pretrained_models_signed_digest(demo: DemoRun) -> None:
    pretrain, fine_tune = job_ids(demo)
    (finished_pretrain,) = log_bodies(demo.data_dir, "job_completed", pretrain)
    (started,) = log_bodies(demo.data_dir, "job_started", fine_tune)
    assert started["init_from"] == {
        "job_id": pretrain,
        "model_digest": finished_pretrain["final_model_digest"],
    }
    # Nothing trained yet at round 0: the global model is exactly the pretrained one.
    assert started["initial_model_digest"] == finished_pretrain["final_model_digest"]
    assert started["model"]["name"] == "bytelm"
    (completed,) = log_bodies(demo.data_dir, "job_completed", fine_tune)
    assert completed["final_model_digest"] != finished_pretrain["final_model_digest"]


def test_both_jobs_attest_and_verify_offline_with_only_the_ca(
    demo: DemoRun, tmp_path: Path
) -> None:
    """An outside reviewer's view: each job's attestation verifies with the CA alone,
    with the project's command and with the stand-alone verifier (no project code), and
    the pretraining job re-runs bit for bit from its attestation."""
    ca = tmp_path / "ca.crt"  # all the reviewer holds besides the attestations
    ca.write_bytes((demo.data_dir / "pki" / "ca.crt").read_bytes())
    verified: dict[str, str] = {}
    for job_id in job_ids(demo):
        attestation = tmp_path / f"{job_id}.dsse.json"
        exported = run_cli(
            "coordinator",
            "provenance",
            "export",
            job_id,
            "--data-dir",
            str(demo.data_dir),
            "-o",
            str(attestation),
        )
        assert exported.returncode == 0, exported.stderr
        checked = run_cli(
            "coordinator",
            "provenance",
            "verify-attestation",
            str(attestation),
            "--ca",
            str(ca),
            "--data-dir",
            str(tmp_path / "no-data-dir"),
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        verified[job_id] = " ".join(checked.stdout.split())
        standalone = subprocess.run(
            [sys.executable, "-I", str(STANDALONE_VERIFIER), str(attestation), str(ca)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert standalone.returncode == 0, standalone.stdout + standalone.stderr
    pretrain, fine_tune = job_ids(demo)
    replayed = replay_from_the_attested_source(demo, pretrain, tmp_path, ca)

    assert f"pretrain job {pretrain} after {OUTER_STEPS} round(s)" in verified[pretrain]
    assert f"federated job {fine_tune} after {ROUNDS} round(s)" in verified[fine_tune]
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert f"replay OK: {OUTER_STEPS} outer step(s) reproduced bit for bit" in " ".join(
        replayed.stdout.split()
    )
    assert "holds the replayed final model" in " ".join(replayed.stdout.split())


def replay_from_the_attested_source(
    demo: DemoRun, job_id: str, tmp_path: Path, ca: Path
) -> subprocess.CompletedProcess[str]:
    """A reviewer's fresh copy of the code: the archive `provenance source` writes, whose
    sha256 and source digest the attestation names, unpacked into an empty directory and
    run from there (`python -m coordinator`, not the installed package), with no data
    dir, another home and only the attestation and the CA certificate."""
    archive = tmp_path / "source.tar"
    written = run_cli(
        "coordinator", "provenance", "source", job_id, "--data-dir", str(demo.data_dir),
        "-o", str(archive),
    )  # fmt: skip
    assert written.returncode == 0, written.stdout + written.stderr
    attestation = tmp_path / f"{job_id}.dsse.json"
    statement = json.loads(base64.b64decode(json.loads(attestation.read_text())["payload"]))
    reproduction = statement["predicate"]["reproduction"]
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == reproduction["source_archive_sha256"]
    assert source_digest_of_archive(archive) == reproduction["source_digest"]
    checkout = tmp_path / "fresh-checkout"
    checkout.mkdir()
    with tarfile.open(archive) as unpacked:
        members = unpacked.getmembers()
        # What tarfile's "data" filter refuses, checked here: the filter came with Python
        # 3.11.4, and the venv may be made from an older 3.11 (Debian's is 3.11.2).
        assert all(
            (member.isfile() or member.isdir())
            and not Path(member.name).is_absolute()
            and ".." not in Path(member.name).parts
            for member in members
        ), [member.name for member in members]
        unpacked.extractall(checkout, members)
    home = tmp_path / "reviewer-home"
    home.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CONSORTIUM_", "RAY_", "FLWR_"))
    }
    env.update({"HOME": str(home), "PYTHONPATH": str(checkout), "COLUMNS": "200"})

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *argv], cwd=checkout, env=env, capture_output=True, text=True,
            timeout=300, check=False,
        )  # fmt: skip

    imported = run("-c", "import coordinator, consortium; print(coordinator.__file__)")
    assert imported.stdout.strip() == str(checkout / "coordinator" / "__init__.py"), imported
    model = DataDir(demo.data_dir).model_file(job_id)  # the file the attestation names
    return run(
        "-m", "coordinator", "replay", "--from-attestation", str(attestation), "--ca", str(ca),
        "--data-dir", str(home / "no-data-dir"), "--model", str(model),
    )  # fmt: skip


def test_each_site_fine_tunes_on_its_own_text(demo: DemoRun) -> None:
    _, fine_tune = job_ids(demo)
    rounds = log_bodies(demo.data_dir, "round", fine_tune)
    assert [body["round"] for body in rounds] == list(range(1, ROUNDS + 1))
    updates = [update for body in rounds for update in body["updates"]]
    # Each site committed to its own text, once per round.
    assert [u["data"]["dataset"] for u in updates] == ["docstrings"] * INSTITUTIONS * ROUNDS
    assert len({u["institution"] for u in updates}) == INSTITUTIONS


def test_every_head_of_the_fine_tune_is_cosigned_by_every_site(demo: DemoRun) -> None:
    """The sites witness the log: every head from the fine-tune's start on is cosigned by
    every institution that trained in it (each round's messages carry the head before
    the round; the job's end asks for the final one), except the head over the last
    round, which their cosignature of the final head vouches for."""
    _, fine_tune = job_ids(demo)
    paths = DataDir(demo.data_dir)
    report = verify_log(paths.provenance_log, SigningKey.load(paths.signing_key).public)
    rounds = log_bodies(demo.data_dir, "round", fine_tune)
    sites = sorted({u["institution"] for body in rounds for u in body["updates"]})
    started_at = next(
        entry["index"]
        for entry in map(json.loads, paths.provenance_log.read_text().splitlines())
        if entry.get("type") == "job_started" and entry["body"]["job_id"] == fine_tune
    )
    heads = [head for head in report.heads if head.tree_size > started_at]
    *per_round, over_last_round, final = heads

    done = run_cli(
        "coordinator",
        "provenance",
        "verify",
        "--min-witnesses",
        str(INSTITUTIONS),
        "--data-dir",
        str(demo.data_dir),
    )

    assert len(sites) == INSTITUTIONS and len(per_round) == ROUNDS
    assert [report.witnesses_of(head) for head in [*per_round, final]] == [sites] * (ROUNDS + 1)
    assert (
        report.witnesses_of(over_last_round) == [] and report.vouched_by(over_last_round) == sites
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"cosigned by {', '.join(sites)}" in " ".join(done.stdout.split())


def test_the_coordinator_reports_the_pipelines_jobs_after_a_restart(
    demo: DemoRun, restarted: Remote
) -> None:
    pretrain, fine_tune = job_ids(demo)
    assert restarted.get(pretrain).job.state == jobs_pb2.JOB_STATE_SUCCEEDED
    tuned = restarted.get(fine_tune)
    assert tuned.job.state == jobs_pb2.JOB_STATE_SUCCEEDED
    rounds = {r.round: r for r in tuned.rounds}
    assert sorted(rounds) == list(range(ROUNDS + 1))
    assert rounds[ROUNDS].metrics["eval_perplexity"] < rounds[0].metrics["eval_perplexity"]
    assert rounds[ROUNDS].participants == INSTITUTIONS


@pytest.mark.parametrize(
    ("init_from", "field"),
    [("000000000000", "field 'init_from'"), (None, "field 'workload'")],
)
def test_bad_init_from_is_invalid_argument(
    demo: DemoRun, restarted: Remote, init_from: str | None, field: str
) -> None:
    pretrain, _ = job_ids(demo)
    spec = FINE_TUNE.format(source=init_from or pretrain)
    if init_from is None:  # a pretraining job produces a bytelm, not a digits CNN
        spec = spec.replace('model = "bytelm"', 'model = "digits-cnn"').replace(
            'dataset = "docstrings"', 'dataset = "digits"'
        )
    before = len(restarted.list_jobs())
    with pytest.raises(InvalidArgumentError, match=field):  # INVALID_ARGUMENT
        restarted.submit(spec)
    assert len(restarted.list_jobs()) == before


FINE_TUNE = """\
name = "bad-finetune"
model = "bytelm"
dataset = "docstrings"
init_from = "{source}"
rounds = 2
min_clients = 2
"""
