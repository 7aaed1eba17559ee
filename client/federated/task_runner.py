"""The site's executor of Flower tasks: what the SuperNode asks of this site runs here,
and only if the coordinator approved it.

`client join` starts its SuperNode with `--isolation process`, so the SuperNode starts
nothing itself: this loop (a thread of `client join`) acquires each ClientApp task from
the SuperNode's loopback Runtime API, authenticated with a per-site secret
(`--superexec-auth-secret-file`, so another local user cannot take the site's tasks).
For each task it:

1. pulls the task's context, run and FAB (`client/federated/task_input.py`);
2. checks, before anything of the run executes and before its message is pulled, that
   the coordinator signed an approval of exactly this run id, this FAB (its sha256,
   computed here) and this job (`consortium/run_approval.py`); a refused run gets an
   error reply (when its message arrives within seconds), an ERROR log line naming the
   run, and `consortium_site_refused_runs_total{reason}`;
3. pulls the message, runs the ClientApp installed with this package
   (`client.federated.client_app:app`), never code from the FAB, in this process, and
   pushes the reply.

Flower's own launcher would start a `flwr-clientapp` process per message with the
task's token in its argv (readable by every local user) and install the FAB's code;
running in-process also saves the process start and the imports (torch) per message.
Built on Flower's Runtime API client; `flwr.supernode.runtime.run_clientapp` is the
reference for the protocol.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from client.federated.fast_poll_supernode import PollPacing
from client.federated.task_input import (
    RunStillApproved,
    TaskHeader,
    pull_task_header,
    pull_task_message,
)
from consortium.errors import TaskRefusedError, WorkloadNotAllowedError
from consortium.run_approval import (
    ListenerUids,
    RefusalReason,
    RunRefusedError,
    check_runtime_api_owner,
    listening_uids,
)

log = logging.getLogger(__name__)

ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
POLL_INTERVAL_S = 0.2  # an idle poll is one loopback HTTP request
# How often the runner asks once it has had no task for a while (PollPacing's busy
# window, as the SuperNode paces its own pulls): an idle SuperNode pulls the SuperLink
# only every 3 s (Flower's wait), so asking it more often finds nothing sooner. Each
# poll costs the SuperNode a few milliseconds of CPU (its Runtime API hands the request
# between its event loop and a worker thread about ten times): measured on a secure
# coordinator with two idle sites, the two SuperNodes and `client join`s used 5.9% of
# a core with the runner asking every 0.2 s, 2.3% every 1 s.
IDLE_POLL_INTERVAL_S = 1.0
ACQUIRE_TIMEOUT_S = 5.0  # the SuperNode answers a poll in milliseconds
# A refused run's message is pulled only to address the error reply to it; a run that
# ended while the SuperNode received it never delivers, and must not hold up the next.
REFUSED_MESSAGE_WAIT_S = 5.0
JOB_ID_KEY = "job-id"  # the run config key naming the job (coordinator/federated/flower_app.py)

# (run id, sha256 of the run's FAB, job id) -> None, or RunRefusedError
RunCheck = Callable[[str, str, str], None]


# How a task's calls to the SuperNode are retried. Not Flower's own invoker: written for
# a `flwr-clientapp` process of its own, it answers a 401 (the task's token no longer
# valid: the SuperNode restarted) by sending SIGINT to its process, which here is
# `client join`: a site whose SuperNode was restarted mid-task then left the consortium.
TASK_RETRY_MAX_S = 60.0
TASK_RETRY_MAX_DELAY_S = 5
RETRYABLE_STATUS = frozenset({502, 503, 504})


def _give_up(error: Exception) -> bool:
    """Only unavailability is worth waiting out; any other answer ends this task."""
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code not in RETRYABLE_STATUS
    return False


def task_retry_invoker() -> RetryInvoker:
    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=TASK_RETRY_MAX_DELAY_S),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=TASK_RETRY_MAX_S,
        should_giveup=_give_up,
    )


@dataclass
class TaskCounts:
    executed: int = 0
    refused: int = 0
    failed: int = 0


class SiteTaskRunner:
    def __init__(
        self,
        runtime_api_address: Callable[[], str],
        auth_secret: bytes,
        check_run: RunCheck,
        app: Callable[[Message, Context], Message],  # a ClientApp, or one loaded on first use
        on_refused: Callable[[RefusalReason], None] = lambda _: None,
        poll_interval_s: float = POLL_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        listener_uids: ListenerUids = listening_uids,
    ) -> None:
        self._listener_uids = listener_uids
        self._address = runtime_api_address  # asked again when the SuperNode restarts
        self._auth_secret = auth_secret
        self._check_run = check_run
        self._app = app
        self._on_refused = on_refused
        self._poll_interval_s = poll_interval_s
        self._pacing = PollPacing(poll_interval_s, clock=clock)
        self.counts = TaskCounts()
        self.connected_to: str | None = None  # the address that last answered

    def _task_client(self, address: str) -> RuntimeHttpClient:
        return RuntimeHttpClient(
            f"http://{address}",  # loopback only: the SuperNode's Runtime API
            verify=False,
            # A port that answers nothing (the SuperNode's, taken by another process)
            # holds the loop this long, not Flower's 30 s.
            timeout=ACQUIRE_TIMEOUT_S,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(
                    master_secret=self._auth_secret, protected_methods={ACQUIRE_METHOD}
                ),
            ],
            # No retry invoker: this loop retries itself, and stays stoppable meanwhile
            # (Flower's invoker backs off for minutes while the SuperNode starts).
            retry_invoker=None,
        )

    def run(self, stop: threading.Event) -> None:
        """Acquire and execute tasks one at a time until `stop` is set."""
        address = self._address()
        tasks = self._task_client(address)
        try:
            while not stop.is_set():
                try:
                    acquired = tasks.AcquireTask(
                        AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
                    )
                except Exception as error:  # the SuperNode restarting, or stopping
                    log.debug("could not ask the SuperNode for a task: %s", error)
                    stop.wait(self._poll_interval_s * 5)
                    if self._address() != address:  # restarted on another port
                        tasks.close()
                        address = self._address()
                        tasks = self._task_client(address)
                    continue
                self.connected_to = address
                if acquired.HasField("task") and acquired.token:
                    self._execute(acquired.token, acquired.task.task_id)
                    self._pacing.note_message()
                else:
                    stop.wait(self.next_poll_s())
        finally:
            tasks.close()

    def next_poll_s(self) -> float:
        """The wait before the next poll: the SuperNode's pull interval while a job's
        messages come (within the busy window of the last task, and of the start),
        at least IDLE_POLL_INTERVAL_S once none has for a while."""
        if self._pacing.busy:
            return self._poll_interval_s
        return max(self._poll_interval_s, IDLE_POLL_INTERVAL_S)

    def _execute(self, token: str, task_id: int) -> None:
        client = RuntimeHttpClient.from_server_address(
            server_address=self._address(),
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=task_retry_invoker(),
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        status, details = SubStatus.FAILED, "the site could not execute the task"
        try:
            header = pull_task_header(client)
            context = header.context
            run_id = str(header.run.run_id)
            fab_hash = hashlib.sha256(header.fab.content).hexdigest()
            job_id = str(header.run.override_config.get(JOB_ID_KEY, ""))
            try:
                self._check_task(run_id, fab_hash, job_id)
            except RunRefusedError as refusal:
                log.error("refused Flower run %s (%s): %s", run_id, refusal.reason, refusal)
                self.counts.refused += 1
                self._on_refused(refusal.reason)
                details = f"the site refused run {run_id}: {refusal}"
                message = self._refused_message(client, header)
                if message is not None:
                    reply = Message(
                        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                        reply_to=message,
                    )
                return
            still_approved = RunStillApproved(lambda: self._check_task(run_id, fab_hash, job_id))
            try:
                message = pull_task_message(client, header, None, still_approved)
            except RunRefusedError as ended:
                log.warning(
                    "abandoned a task of Flower run %s: its message stopped arriving and "
                    "the run ended (%s)",
                    run_id,
                    ended,
                )
                details = f"run {run_id} ended while its message was arriving: {ended}"
                self.counts.failed += 1
                return
            reply = self._app(message, context)
            status, details = SubStatus.COMPLETED, ""
            self.counts.executed += 1
        except Exception as error:
            self.counts.failed += 1
            _log_failure(task_id, error)
            details = told_to_coordinator(error)
            if message is not None:
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                    reply_to=message,
                )
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client, context, status, details)
            except Exception:
                log.exception("could not return task %d to the SuperNode", task_id)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()

    def _check_task(self, run_id: str, fab_hash: str, job_id: str) -> None:
        """RunRefusedError unless the task came from this site's own SuperNode and the
        coordinator approved its run.

        Flower's Runtime API authenticates the task runner, not the server: a local user
        who binds the port first (while the SuperNode starts or restarts) hands out
        tasks of its choosing, with a node_config naming the data dir, workloads and
        signing key the ClientApp trusts, and the run id, FAB and job of a real approved
        run (every member's site sees them). Only a port whose every listener is this
        site's own user (its SuperNode) is believed; checked once the task's connection
        exists, while a squatter's listener is still serving it."""
        check_runtime_api_owner(self._address(), self._listener_uids)
        self._check_run(run_id, fab_hash, job_id)

    @staticmethod
    def _refused_message(client: RuntimeHttpClient, header: TaskHeader) -> Message | None:
        """A refused run's message, to address the error reply to; None when it does
        not arrive in time (the task then ends FAILED without a reply)."""
        try:
            return pull_task_message(client, header, max_time_s=REFUSED_MESSAGE_WAIT_S)
        except Exception as error:
            log.warning("the refused task's message did not arrive: %s", error)
            return None


def told_to_coordinator(error: Exception) -> str:
    """What the coordinator hears of a task that failed here (the error reply's reason,
    recorded with the round). A site's refusal says why (`TaskRefusedError`: its
    message names only what the coordinator sent). Anything else is named by its type
    alone: an exception's text may quote the site's data (numpy puts the value it could
    not convert in its message: a patient's name from a column of the wrong type), its
    paths or its files' fields. The site's own log has the whole error."""
    if isinstance(error, TaskRefusedError):
        return f"{type(error).__name__}: {error}"
    return f"{type(error).__name__} at the site (its operator's log has the details)"


def _log_failure(task_id: int, error: Exception) -> None:
    if isinstance(error, WorkloadNotAllowedError):
        log.warning("refused task %d: %s", task_id, error)  # the site's own choice
    else:
        log.exception("task %d failed", task_id, exc_info=error)
