"""A seeded chaos run: a federated job on a local consortium while processes are killed.

`ChaosRun` brings up a coordinator and two sites (real processes, loopback, no TLS: the
crash paths are the same with it), submits a federated job that retains its updates, and
then, `faults` times, sleeps a seeded while, `kill -9`s one process of the tree and
restarts what an operator would (`coordinator serve` or a site's `client join`, when
they are gone). The first fault is always the coordinator, right after round 2 (issue
15's scenario); the next ones hit every other target once, in a seeded order, and the
rest pick among them: the coordinator, its SuperLink, the job's ServerApp, a site's
SuperNode, a site's `client join` (which runs the ClientApp). A target with no process
at that moment (no ServerApp between runs) passes to the next. Then
it waits for the job and reports what the invariants need: the job's state, every
logged round of the job, `provenance verify` and `replay`, and the processes left.

Used by tests/chaos/test_chaos.py (a short run in CI) and benchmarks/chaos.py (long).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from consortium.leftovers import find_leftovers
from consortium.processes import ChildProcess, descendant_pids, venv_executable
from consortium.provenance.records import Round
from consortium.provenance.signing import SigningKey
from consortium.provenance.verify import verify_log
from consortium.tensor_digest import file_digest
from coordinator.data_dir import DataDir
from coordinator.local_consortium import LocalConsortium
from coordinator.state import JobRecord, JobState, SqliteStateStore
from tests.conftest import Processes
from tests.helpers import TEST_PROFILE, wait_for, write_partitions

SITES = ("alpha", "beta")
TARGETS = ("coordinator", "superlink", "serverapp", "supernode", "client-join")
FINAL = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
JOB_TIMEOUT_S = 600.0
TARGET_WAIT_S = 30.0
SETTLE_S = 2.0  # a killed SuperLink or SuperNode takes its parent down within this


def job_spec(rounds: int, seed: int) -> str:
    return (
        f'name = "chaos"\nmodel = "digits-cnn"\ndataset = "digits"\nrounds = {rounds}\n'
        f"min_clients = 1\nlocal_epochs = 1\nlearning_rate = 0.05\nseed = {seed}\n"
        "round_timeout_s = 20.0\nretain_updates = true\n"
    )


@dataclass(frozen=True)
class Fault:
    target: str
    pid: int
    after_round: int


@dataclass
class ChaosReport:
    planned_rounds: int = 0
    faults: list[Fault] = field(default_factory=list)
    recoveries: int = 0  # coordinators and sites restarted
    job: JobRecord | None = None
    logged_rounds: list[int] = field(default_factory=list)
    verify_ok: bool = False
    replay: subprocess.CompletedProcess[str] | None = None
    model_sha256: str = ""
    final_accuracy: float | None = None  # held-out, after the last round
    left_running: list[int] = field(default_factory=list)

    @property
    def rounds_lost(self) -> int:
        return len(set(range(1, self.planned_rounds + 1)) - set(self.logged_rounds))

    @property
    def rounds_twice(self) -> int:
        return len(self.logged_rounds) - len(set(self.logged_rounds))


class ChaosRun:
    def __init__(
        self,
        root: Path,
        processes: Processes,
        *,
        seed: int,
        faults: int,
        rounds: int,
        say: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.root = root
        self.processes = processes
        self.rng = random.Random(seed)
        self.seed = seed
        self.faults = faults
        self.rounds = rounds
        self.say = say
        # The launcher's report of a dead ServerApp is immediate; Flower's status is
        # asked often too, so a run that ended is noticed within seconds.
        env = {**TEST_PROFILE, "CONSORTIUM_COORDINATOR_FLOWER_STATUS_INTERVAL_S": "2"}
        self.consortium = LocalConsortium(
            root, secure=False, ray=False, env=env, launcher=processes, sites_dir=root
        )
        self.serve: ChildProcess | None = None
        self.joins: dict[str, ChildProcess] = {}
        self.data: dict[str, Path] = {}
        self.restarts = 0
        self.job_id = ""

    # --- the run -----------------------------------------------------------------
    def run(self) -> ChaosReport:
        report = ChaosReport(planned_rounds=self.rounds)
        self._start_coordinator()
        for name, data in zip(SITES, write_partitions(self.root, list(SITES)), strict=True):
            self.data[name] = data
            self._start_site(name)
        self.consortium.wait_for_online(len(SITES))
        with self.consortium.connect() as remote:
            self.job_id = remote.submit(job_spec(self.rounds, self.seed)).job_id
        self.say(f"job {self.job_id}: {self.rounds} rounds, {self.faults} faults")
        wait_for("round 2", lambda: self._job().rounds_completed >= 2, JOB_TIMEOUT_S)
        # The coordinator first (issue 15's scenario), then every other target once in a
        # seeded order, then seeded choices.
        others = [t for t in TARGETS if t != "coordinator"]
        first_pass = ["coordinator", *self.rng.sample(others, len(others))]
        for number in range(self.faults):
            if self._job().state in FINAL:
                break
            if number > 0:
                time.sleep(self.rng.uniform(1.0, 4.0))
            fault = self._inject(first_pass[number] if number < len(first_pass) else None)
            if fault is not None:
                report.faults.append(fault)
                self.say(f"fault {number + 1}: killed {fault.target} (pid {fault.pid})")
            self._recover()
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while self._job().state not in FINAL and time.monotonic() < deadline:
            self._recover()  # a late death (a SuperNode that lost its SuperLink)
            time.sleep(1.0)
        report.recoveries = self.restarts
        report.job = self._job()
        self._check_log(report)
        return report

    def stop_and_count_leftovers(self, report: ChaosReport) -> None:
        """Stop everything, then list every process of the run still alive."""
        self.processes.stop_all()
        dirs = [self.consortium.data_dir] + [self.consortium.state_dir(n) for n in SITES]
        leftovers = {p.pid for d in dirs for p in find_leftovers(d)}
        report.left_running = sorted(set(self.processes.alive()) | leftovers)

    # --- faults ------------------------------------------------------------------
    def _inject(self, target: str | None) -> Fault | None:
        order = self.rng.sample(TARGETS, len(TARGETS))
        if target is not None:  # this one, once it runs (a ServerApp between runs)
            deadline = time.monotonic() + TARGET_WAIT_S
            while not self._pids_of(target) and time.monotonic() < deadline:
                time.sleep(0.2)
            order = [target, *(t for t in order if t != target)]
        for candidate in order:
            pids = self._pids_of(candidate)
            if not pids:
                continue
            pid = self.rng.choice(sorted(pids))
            after = self._job().rounds_completed
            self.processes.remember_descendants()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            return Fault(candidate, pid, after)
        return None

    def _pids_of(self, target: str) -> list[int]:
        if target == "coordinator":
            return [self.serve.pid] if self.serve is not None and self._alive(self.serve) else []
        if target == "client-join":
            return [j.pid for j in self.joins.values() if self._alive(j)]
        if target in ("superlink", "serverapp"):
            roots = [self.serve] if self.serve is not None else []
            marker = "flower-superlink" if target == "superlink" else "flwr-serverapp"
        else:
            roots = list(self.joins.values())
            marker = "flower-supernode"
        found = []
        for root in roots:
            for pid in descendant_pids(root.pid):
                try:
                    if any(marker in part for part in psutil.Process(pid).cmdline()):
                        found.append(pid)
                except psutil.Error:
                    continue
        return found

    # --- recovery, as an operator would ---------------------------------------------
    def _recover(self) -> None:
        time.sleep(SETTLE_S)
        if self.serve is None or not self._alive(self.serve):
            self._start_coordinator()
            self.restarts += 1
        for name, join in self.joins.items():
            if not self._alive(join):
                self._start_site(name)
                self.restarts += 1

    def _start_coordinator(self) -> None:
        # Whatever the dead one left, its reaper or the successor's own claim stops.
        if self.serve is not None:
            self.serve.stop()
        self.consortium.serve(f"coordinator-{len(self.processes.children)}")
        self.serve = self.processes.children[-1]

    def _start_site(self, name: str) -> None:
        old = self.joins.get(name)
        if old is not None:
            old.stop()
        child = f"client-{name}-{len(self.processes.children)}"
        self.joins[name] = self.consortium.join(name, self.data[name], child_name=child)

    @staticmethod
    def _alive(child: ChildProcess) -> bool:
        return child.poll() is None

    # --- checks ------------------------------------------------------------------
    def _job(self) -> JobRecord:
        store = SqliteStateStore(self.consortium.paths.state_db)
        try:
            return store.get_job(self.job_id)
        finally:
            store.close()

    def _check_log(self, report: ChaosReport) -> None:
        paths = DataDir(self.consortium.data_dir)
        key = SigningKey.load(paths.signing_key).public
        verified = verify_log(paths.provenance_log, key)
        report.verify_ok = True
        report.logged_rounds = [
            r.round for r in verified.jobs.get(self.job_id, []) if isinstance(r, Round)
        ]
        report.replay = subprocess.run(
            [
                venv_executable("coordinator"),
                "replay",
                self.job_id,
                "--data-dir",
                str(self.consortium.data_dir),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if report.job is not None and report.job.model_path:
            report.model_sha256 = file_digest(report.job.model_path)
        store = SqliteStateStore(self.consortium.paths.state_db)
        try:
            rounds = store.list_rounds(self.job_id)
        finally:
            store.close()
        if rounds:
            report.final_accuracy = rounds[-1].metrics.get("eval_accuracy")
