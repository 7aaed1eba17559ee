"""The coordinator's runtimes as seen from outside: `GetStatus` and grpc.health.v1.

`coordinator status` calls `CoordinatorStatus.GetStatus`: each supervised runtime (the
Flower SuperLink, the Ray head) with its state, restarts and why it is not running.
Load balancers and probes speak the standard health protocol instead
(`grpc.health.v1.Health`, as `grpc_health_probe` does) on the same port: service ""
is the control plane itself (SERVING while it serves, NOT_SERVING once it is shutting
down), and ``runtime/<name>`` each runtime (SERVING only while it runs). The
supervision loop calls `RuntimeHealth.refresh` after every check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import grpc
from grpc_health.v1 import health, health_pb2

from consortium.proto.v1 import status_pb2, status_pb2_grpc
from consortium.supervision import ChildState, Supervisor
from coordinator.api.status import unary

STATES = {
    ChildState.RUNNING: status_pb2.RUNTIME_STATE_RUNNING,
    ChildState.RESTARTING: status_pb2.RUNTIME_STATE_RESTARTING,
    ChildState.FAILED: status_pb2.RUNTIME_STATE_FAILED,
}
RUNTIME_SERVICE_PREFIX = "runtime/"


class RuntimeHealth:
    """The standard health service, kept in step with the supervisor."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self.servicer = health.HealthServicer()
        self.servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self.refresh()

    def refresh(self) -> None:
        for status in self._supervisor.status():
            serving = status.state is ChildState.RUNNING
            self.servicer.set(
                RUNTIME_SERVICE_PREFIX + status.name,
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING,
            )

    def shutting_down(self) -> None:
        """Every service NOT_SERVING from now on (open watches are told)."""
        self.servicer.enter_graceful_shutdown()


class CoordinatorStatusServicer(status_pb2_grpc.CoordinatorStatusServicer):
    def __init__(
        self,
        supervisor: Supervisor,
        addresses: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._supervisor = supervisor
        self._addresses = dict(addresses)
        self._clock = clock
        self._started = clock()

    @unary
    def GetStatus(
        self, request: status_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> status_pb2.GetStatusResponse:
        reply = status_pb2.GetStatusResponse(uptime_s=int(self._clock() - self._started))
        for status in self._supervisor.status():
            runtime = reply.runtimes.add(
                name=status.name,
                state=STATES[status.state],
                restarts=status.restarts,
                detail=status.detail,
                address=self._addresses.get(status.name, ""),
            )
            if status.last_exit_code is not None:
                runtime.last_exit_code = status.last_exit_code
            if status.state is not ChildState.RUNNING:
                reply.degraded.append(status.name)
        return reply
