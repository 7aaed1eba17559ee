"""`GetStatus` and grpc.health.v1 over a real gRPC server, driven by a supervisor whose
children the test kills (issue 19)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from consortium.proto.v1 import status_pb2, status_pb2_grpc
from consortium.supervision import RestartPolicy, Supervisor
from coordinator.api.runtime_status import CoordinatorStatusServicer, RuntimeHealth
from coordinator.observability.metrics import CoordinatorMetrics, RuntimeCollector
from tests.unit.supervision_fakes import Clock, FakeChild

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Served:
    def __init__(self) -> None:
        self.clock = Clock()
        self.superlink, self.ray_head = FakeChild("superlink"), FakeChild("ray-head")
        policy = RestartPolicy(max_restarts=1, window_s=60.0)
        self.supervisor = Supervisor([self.superlink, self.ray_head], policy, clock=self.clock)
        self.health = RuntimeHealth(self.supervisor)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        status = CoordinatorStatusServicer(
            self.supervisor, {"superlink": "127.0.0.1:9092"}, clock=self.clock
        )
        status_pb2_grpc.add_CoordinatorStatusServicer_to_server(status, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.status = status_pb2_grpc.CoordinatorStatusStub(self.channel)
        self.probe = health_pb2_grpc.HealthStub(self.channel)

    def check(self, service: str) -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        return int(self.probe.Check(request, timeout=5).status)

    def get(self) -> status_pb2.GetStatusResponse:
        reply: status_pb2.GetStatusResponse = self.status.GetStatus(
            status_pb2.GetStatusRequest(), timeout=5
        )
        return reply

    def step(self, seconds: float) -> None:
        self.clock.now += seconds
        self.supervisor.check()
        self.health.refresh()


@pytest.fixture
def served() -> Iterator[Served]:
    served = Served()
    yield served
    served.channel.close()
    served.server.stop(None)


def test_everything_running_is_serving_and_not_degraded(served: Served) -> None:
    reply = served.get()
    assert [(r.name, r.state, r.restarts) for r in reply.runtimes] == [
        ("superlink", status_pb2.RUNTIME_STATE_RUNNING, 0),
        ("ray-head", status_pb2.RUNTIME_STATE_RUNNING, 0),
    ]
    assert reply.runtimes[0].address == "127.0.0.1:9092"
    assert not reply.runtimes[0].HasField("last_exit_code")
    assert list(reply.degraded) == []
    assert served.check("") == SERVING
    assert served.check("runtime/superlink") == SERVING == served.check("runtime/ray-head")


def test_a_dead_runtime_is_degraded_until_restarted_then_failed_for_good(
    served: Served,
) -> None:
    served.ray_head.code = -9
    served.step(0.0)
    reply = served.get()
    head = reply.runtimes[1]
    assert head.state == status_pb2.RUNTIME_STATE_RESTARTING and head.last_exit_code == -9
    assert "restarting in 1 s" in head.detail and list(reply.degraded) == ["ray-head"]
    assert served.check("runtime/ray-head") == NOT_SERVING
    assert served.check("runtime/superlink") == SERVING == served.check("")

    served.step(1.0)
    assert served.get().runtimes[1].restarts == 1
    assert served.check("runtime/ray-head") == SERVING

    served.ray_head.code = 1  # again within the window: max_restarts=1 is spent
    served.step(1.0)
    head = served.get().runtimes[1]
    assert head.state == status_pb2.RUNTIME_STATE_FAILED and "gave up" in head.detail
    assert served.check("runtime/ray-head") == NOT_SERVING


def test_an_unknown_service_is_not_found_and_shutdown_stops_serving(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        served.check("runtime/edge")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    served.health.shutting_down()
    assert served.check("") == NOT_SERVING


def test_the_runtime_gauge_follows_the_supervisor(served: Served) -> None:
    metrics = CoordinatorMetrics()
    metrics.add_collector(RuntimeCollector(served.supervisor.status))
    served.superlink.code = 1
    served.step(0.0)
    up = {
        s.labels["runtime"]: s.value
        for family in metrics.registry.collect()
        if family.name == "consortium_runtime_up"
        for s in family.samples
    }
    assert up == {"superlink": 0.0, "ray-head": 1.0}
    metrics.child_restarted("superlink")
    assert (
        metrics.registry.get_sample_value("consortium_child_restarts_total", {"child": "superlink"})
        == 1.0
    )
