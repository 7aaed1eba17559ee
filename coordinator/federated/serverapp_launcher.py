"""Starts the ServerApp of approved runs only: the coordinator's side of run approval.

The SuperLink runs with `--isolation process`, so it starts no ServerApp itself (Flower's
own launcher would start one for any run anyone starts through the Control API, as the
coordinator's user, with the run's token in its argv). This thread takes each ServerApp
task from the SuperLink's Runtime API (authenticated with a per-start secret, 0600) and:

* starts `flwr-serverapp` for it only if the coordinator approved the run
  (`RunApprovals`: the job runner signs every run it starts) and the task's FAB is the
  approved one; the task's token goes in a 0600 file (`--token-file`), never in argv;
* otherwise refuses: stops the run through Flower, logs the run id and counts
  `consortium_auth_refusals_total{channel="flower_run"}`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import (
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.runtime import RuntimeHttpClient

from consortium.processes import ChildProcess, venv_executable
from consortium.run_approval import (
    ListenerUids,
    RunRefusedError,
    check_runtime_api_owner,
    listening_uids,
)
from coordinator.federated.approvals import RunApprovals

log = logging.getLogger(__name__)

ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
# Each poll is a request the SuperLink answers with a few SQL statements (it also
# expires old task tokens): at 0.2 s an idle coordinator's SuperLink used 5% of a
# core. A ServerApp then starts at most this long after its run.
POLL_INTERVAL_S = 0.5
# With no ServerApp running and no approved run waiting for one, the only task that can
# appear is a run nobody approved (to be refused), so the launcher asks ten times less
# often, and an approval wakes it at once.
IDLE_POLL_INTERVAL_S = 5.0
# How long a run's task waits for its approval: the job runner signs it right after
# the run starts (milliseconds); a run nobody approved is refused after this.
APPROVAL_WAIT_S = 15.0
UNAPPROVED = "unapproved"
FAB_MISMATCH = "fab_mismatch"
FOREIGN_RUNTIME_API = "foreign_runtime_api"


@dataclass(frozen=True)
class RuntimeEndpoint:
    """The SuperLink's Runtime API as a ServerApp reaches it."""

    address: str
    ca_cert: Path | None  # None: the SuperLink runs --insecure (loopback experiments)


@dataclass
class _Started:
    run_id: str
    process: ChildProcess
    token_file: Path


class ServerAppLauncher:
    def __init__(
        self,
        runtime: RuntimeEndpoint,
        auth_secret: bytes,
        approvals: RunApprovals,
        work_dir: Path,
        log_file: Path,
        env: dict[str, str],
        stop_run: Callable[[str], None],
        on_refusal: Callable[[str], None] = lambda _: None,
        approval_wait_s: float = APPROVAL_WAIT_S,
        listener_uids: ListenerUids = listening_uids,
    ) -> None:
        self._listener_uids = listener_uids
        self._runtime = runtime
        self._approvals = approvals
        self._work_dir = work_dir  # token files, 0600, removed when their app ends
        self._log_file = log_file
        self._env = env
        self._stop_run = stop_run
        self._on_refusal = on_refusal
        self._approval_wait_s = approval_wait_s
        self._stop = threading.Event()
        self._wake = threading.Event()  # an approval or stop: poll now
        self._handled: set[str] = set()  # runs launched or refused here
        self._started: list[_Started] = []
        self._exited: dict[str, int] = {}  # run id -> its ServerApp's exit code
        self._exited_lock = threading.Lock()
        root = runtime.ca_cert.read_bytes() if runtime.ca_cert is not None else None
        self._tasks = RuntimeHttpClient.from_server_address(
            server_address=runtime.address,
            insecure=runtime.ca_cert is None,
            root_certificates=root,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(
                    master_secret=auth_secret, protected_methods={ACQUIRE_METHOD}
                ),
            ],
            retry_invoker=None,  # the loop retries, and stays stoppable meanwhile
        )
        self._work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        approvals.on_approval(self._wake.set)
        self._thread = threading.Thread(target=self._loop, name="serverapp-launcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self._tasks.close()
        for started in self._started:
            started.process.stop()
            started.token_file.unlink(missing_ok=True)
        self._started.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._reap()
            try:
                acquired = self._tasks.AcquireTask(
                    AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP.value])
                )
            except Exception as error:  # the SuperLink starting or stopping
                log.debug("could not ask the SuperLink for a task: %s", error)
                self._stop.wait(POLL_INTERVAL_S * 5)
                continue
            if acquired.HasField("task") and acquired.token:
                task = acquired.task
                try:
                    self._launch_if_approved(acquired.token, str(task.run_id), task.fab_hash)
                except Exception:
                    log.exception("could not handle the ServerApp task of run %s", task.run_id)
            else:
                self._wake.wait(self._poll_interval_s())
                self._wake.clear()

    def _poll_interval_s(self) -> float:
        approved = self._approvals.run_ids()
        self._handled &= approved  # a withdrawn run is done with: the set stays small
        waiting = approved - self._handled
        return POLL_INTERVAL_S if self._started or waiting else IDLE_POLL_INTERVAL_S

    def _launch_if_approved(self, token: str, run_id: str, fab_hash: str) -> None:
        self._handled.add(run_id)
        if self._runtime.ca_cert is None:
            # Without TLS nothing proves the Runtime API is our SuperLink: a local user
            # who binds its port first (while it restarts) hands out a task naming an
            # approved run (any local user lists runs through the Control API), and
            # the ServerApp started for it installs and imports that user's FAB.
            try:
                check_runtime_api_owner(self._runtime.address, self._listener_uids)
            except RunRefusedError as foreign:
                log.error("refused a ServerApp task of Flower run %s: %s", run_id, foreign)
                self._on_refusal(FOREIGN_RUNTIME_API)
                return  # not stopped: the run may be real, the server is not ours
        signed = self._approvals.wait_for(run_id, self._approval_wait_s)
        approved = signed.verify(self._approvals.public_key) if signed is not None else None
        if approved is None:
            self._refuse(run_id, UNAPPROVED, "the coordinator approved no such run")
        # A task naming no app is refused too: the ServerApp installs whatever FAB the
        # Runtime API hands it, so only the approved one's hash may start it.
        elif fab_hash != approved.fab_hash:
            self._refuse(
                run_id,
                FAB_MISMATCH,
                f"its app {fab_hash[:16]} is not the approved {approved.fab_hash[:16]}",
            )
        else:
            self._launch(token, run_id)

    def _refuse(self, run_id: str, reason: str, detail: str) -> None:
        log.error(
            "refused to start the ServerApp of Flower run %s (%s): %s", run_id, reason, detail
        )
        self._on_refusal(reason)
        try:
            self._stop_run(run_id)
        except Exception as error:
            log.warning("could not stop the refused Flower run %s: %s", run_id, error)

    def _launch(self, token: str, run_id: str) -> None:
        token_file = self._work_dir / f"run-{run_id}.token"
        token_file.unlink(missing_ok=True)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token)
        argv = [
            venv_executable("consortium-flwr-serverapp"),
            "--runtime-api-address",
            self._runtime.address,
            "--token-file",
            str(token_file),
            "--parent-pid",
            str(os.getpid()),
        ]
        if self._runtime.ca_cert is None:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(self._runtime.ca_cert)]
        process = ChildProcess("flwr-serverapp", argv, self._log_file, env=self._env)
        self._started.append(_Started(run_id, process, token_file))
        log.info("started the ServerApp of approved Flower run %s", run_id)

    def exit_code(self, run_id: str) -> int | None:
        """The exit code of the ServerApp this launcher started for `run_id`, once it
        has exited (None: running, or never started here)."""
        with self._exited_lock:
            return self._exited.get(run_id)

    def _reap(self) -> None:
        for started in [s for s in self._started if s.process.poll() is not None]:
            started.token_file.unlink(missing_ok=True)
            self._started.remove(started)
            code = started.process.poll()
            assert code is not None
            # Reaps it, ends what it left in its process group, closes its log.
            started.process.stop()
            with self._exited_lock:
                self._exited[started.run_id] = code
            log.info("the ServerApp of Flower run %s exited with code %d", started.run_id, code)
