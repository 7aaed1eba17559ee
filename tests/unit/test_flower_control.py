"""`FlowerControl` asks the SuperLink's Control API in-process: a request the coordinator
is waiting on is abandoned when the coordinator stops (the scheduler's thread, which the
stop waits for, was held for up to the request's timeout: a SIGTERMed `serve` was
killed after 10 s), none is sent once it is stopping, and a failed one says why in the
SuperLink's own words. The SuperLink here is a plain HTTP server on loopback speaking
the Control API's protobuf-over-HTTP, so each answer (or silence) is the test's."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.proto.control_pb2 import ListNodesResponse
from flwr.proto.node_pb2 import NodeInfo

from coordinator.federated.flower_app import FlowerControl, FlowerControlError


class FakeControlApi(http.server.BaseHTTPRequestHandler):
    """Answers every request with the server's `status` and `body`."""

    def do_POST(self) -> None:
        server = self.server
        assert isinstance(server, FakeSuperLink)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        server.paths.append(self.path)
        self.send_response(server.status)
        self.send_header("content-length", str(len(server.body)))
        self.end_headers()
        self.wfile.write(server.body)

    def log_message(self, *args: object) -> None:
        pass


class FakeSuperLink(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FakeControlApi)
        self.paths: list[str] = []
        self.status = 200
        self.body = b""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def superlink() -> Iterator[FakeSuperLink]:
    server = FakeSuperLink()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def control(tmp_path: Path, address: str, stopping: threading.Event) -> FlowerControl:
    return FlowerControl(tmp_path / "data", address, None, stopping=stopping)


def test_a_request_in_flight_is_abandoned_when_the_coordinator_stops(tmp_path: Path) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    stopping = threading.Event()
    flower = control(tmp_path, f"127.0.0.1:{silent.getsockname()[1]}", stopping)
    timer = threading.Timer(0.3, stopping.set)
    timer.start()
    try:
        with pytest.raises(FlowerControlError, match="abandoned: the coordinator is stopping"):
            flower.list_supernodes()
    finally:
        timer.cancel()
        flower.close()
        silent.close()


def test_no_request_is_sent_once_the_coordinator_is_stopping(
    tmp_path: Path, superlink: FakeSuperLink
) -> None:
    stopping = threading.Event()
    flower = control(tmp_path, superlink.address, stopping)
    node = NodeInfo(node_id=7, status="online", registered_at="2026-01-01T00:00:00+00:00")
    superlink.body = ListNodesResponse(nodes_info=[node]).SerializeToString()
    try:
        assert [(n.node_id, n.status) for n in flower.list_supernodes()] == [("7", "online")]
        assert superlink.paths == ["/v1/control/list-nodes"]
        stopping.set()
        with pytest.raises(FlowerControlError, match="not asked: the coordinator is stopping"):
            flower.list_supernodes()
        assert superlink.paths == ["/v1/control/list-nodes"]  # nothing more reached it
    finally:
        flower.close()


def test_a_refused_request_says_why_in_the_superlinks_words(
    tmp_path: Path, superlink: FakeSuperLink
) -> None:
    flower = control(tmp_path, superlink.address, threading.Event())
    superlink.status = 404
    superlink.body = b'{"code":16,"detail":"Run ID not found."}'
    try:
        with pytest.raises(FlowerControlError, match=r"refused \(HTTP 404\).*Run ID not found"):
            flower.status("12")
    finally:
        flower.close()


def test_an_unreachable_superlink_is_named(tmp_path: Path) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens there now
    flower = control(tmp_path, address, threading.Event())
    try:
        with pytest.raises(FlowerControlError, match="the SuperLink is unreachable"):
            flower.stop("12")
    finally:
        flower.close()
