"""The site's Fleet forwarder: the SuperNode's loopback way to the coordinator's edge.

flwr 1.41's SuperNode speaks HTTPS with a root certificate only; it cannot present a
client certificate. The coordinator's Fleet edge requires one (mutual TLS from the
consortium CA), so the SuperNode talks plain HTTP to this forwarder on 127.0.0.1 and the
forwarder opens, per connection, a TLS connection to the edge that presents the
institution's certificate and key (bundle and state dir) and verifies the edge against
the consortium CA. It copies bytes both ways and parses nothing: the HTTP is the
SuperNode's, the checks are the edge's.

Why plain HTTP on loopback rather than TLS with a local certificate: the hop never
leaves the host, the only peers that could reach it are local processes of the site,
which already run with the site's keys (the SuperNode's own signing key included), and
a local certificate would add a second trust root to manage for no attacker it stops.
The listener binds 127.0.0.1 only; every Fleet call is still signed with the
SuperNode's onboarded key, which the SuperLink checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading

from consortium.errors import UnreachableError
from consortium.net import split_host_port
from consortium.tls import ClientTls

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT_S = 10.0
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
CHUNK_BYTES = 64 * 1024
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})


def edge_target(fleet_address: str, coordinator_address: str) -> tuple[str, int]:
    """Where the edge is: the address the coordinator returned, with a wildcard host
    (an edge bound to all interfaces) replaced by the coordinator's own host."""
    host, port = split_host_port(fleet_address)
    if host in _WILDCARDS:
        host, _ = split_host_port(coordinator_address)
    return host.strip("[]"), port


def client_ssl_context(tls: ClientTls) -> ssl.SSLContext:
    """Verify the edge against the consortium CA; prove the institution's identity."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_cert))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(CHUNK_BYTES):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()


class FleetForwarder:
    """Listens on 127.0.0.1 (port 0: any free); forwards each connection to the edge
    over mutual TLS. `address` is what the SuperNode's `--superlink` gets."""

    def __init__(self, edge_host: str, edge_port: int, tls: ClientTls, port: int = 0) -> None:
        self._edge = (edge_host, edge_port)
        self._context = client_ssl_context(tls)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(port,), name="fleet-forwarder", daemon=True
        )
        self._thread.start()
        self._ready.wait(START_TIMEOUT_S)
        if self._server is None:
            self.stop()
            raise UnreachableError(
                f"the Fleet forwarder could not listen on {LOOPBACK}:{port}: "
                f"{self._failure or 'timeout'}"
            )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("Fleet forwarder on %s to the edge at %s:%d", self.address, *self._edge)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _run(self, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, LOOPBACK, port)
            )
        except OSError as error:
            self._failure = error
            return
        finally:
            self._ready.set()
        self._loop.run_forever()
        # Stopped: close the listener and let open connections end.
        self._server.close()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.run_until_complete(self._server.wait_closed())

    async def _handle(self, local_r: asyncio.StreamReader, local_w: asyncio.StreamWriter) -> None:
        host, port = self._edge
        try:
            edge_r, edge_w = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=self._context, server_hostname=host),
                CONNECT_TIMEOUT_S,
            )
        except (TimeoutError, OSError) as error:
            # The SuperNode sees a closed connection and retries; this says why.
            log.warning("Fleet forwarder: cannot reach the edge at %s:%d: %s", host, port, error)
            local_w.close()
            return
        try:
            await asyncio.gather(_pipe(local_r, edge_w), _pipe(edge_r, local_w))
        finally:
            for writer in (local_w, edge_w):
                writer.close()

    def stop(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STOP_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()
