"""How metrics leave a process (an HTTP endpoint) and enter it from others (files).

Both roles serve Prometheus metrics on an address from their settings. Port 0
lets the OS choose; the bound address is written to a file, so tests and
operators can find it, and removed when the endpoint stops.

Flower runs the ServerApp and the ClientApp as processes of its own, so numbers
they produce cannot be counted in our memory. Such a process appends JSON lines
to a file instead, and a collector in the long-running process reads what was
appended since its last scrape with `JsonLinesTail`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from consortium.net import split_host_port

log = logging.getLogger(__name__)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# An idle connection's thread ends after this long. prometheus_client's own server
# waits on one forever, a thread each: a local user holding a few hundred open made the
# endpoint stop answering. A scrape sends its request at once.
REQUEST_TIMEOUT_S = 10.0


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (as prometheus_client's handler does)."""


class MetricsServer:
    """A started `/metrics` endpoint for one registry; `stop()` closes its socket."""

    def __init__(
        self,
        address: str,
        registry: CollectorRegistry,
        address_file: Path,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        host, port = split_host_port(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = type("MetricsHttpServer", (ThreadingWSGIServer,), {"address_family": family})
        handler = type("MetricsHandler", (_QuietHandler,), {"timeout": request_timeout_s})
        self._httpd: ThreadingWSGIServer = make_server(
            host, port, make_wsgi_app(registry), server, handler
        )
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()
        self.address = format_address(host, self._httpd.server_address[1])
        self._address_file = address_file
        address_file.parent.mkdir(parents=True, exist_ok=True)
        # Written whole, then renamed: a reader never sees half an address.
        partial = address_file.with_suffix(".partial")
        partial.write_text(self.address)
        os.replace(partial, address_file)
        log.info("metrics on http://%s/metrics", self.address)

    def stop(self) -> None:
        self._address_file.unlink(missing_ok=True)
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@dataclass
class TailRead:
    lines: list[dict[str, Any]] = field(default_factory=list)
    # The file was replaced or truncated: totals built from earlier reads are void.
    restarted: bool = False


class JsonLinesTail:
    """Reads the complete JSON-object lines appended to a file since the last read.

    A line without its newline yet is left for the next read, so a writer caught
    mid-append is never half-parsed. Lines that are not JSON objects are skipped
    with a warning rather than failing the scrape.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._inode: int | None = None
        self._lock = threading.Lock()

    def size_bytes(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def read_new(self) -> TailRead:
        with self._lock:
            try:
                handle = self.path.open("rb")
            except FileNotFoundError:
                return TailRead()
            with handle:
                stat = os.fstat(handle.fileno())
                result = TailRead()
                if stat.st_ino != self._inode or stat.st_size < self._offset:
                    result.restarted = self._inode is not None
                    self._inode, self._offset = stat.st_ino, 0
                handle.seek(self._offset)
                data = handle.read()
            end = data.rfind(b"\n") + 1
            self._offset += end
            result.lines = [obj for obj in map(_parse, data[:end].splitlines()) if obj]
            return result


def _parse(line: bytes) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except ValueError:
        log.warning("skipping a line that is not JSON in a metrics file: %r", line[:80])
        return None
    if not isinstance(value, dict):
        log.warning("skipping a line that is not a JSON object in a metrics file")
        return None
    return value
