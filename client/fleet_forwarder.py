"""The site's Fleet forwarder: the SuperNode's loopback way to the coordinator's edge.

flwr 1.41's SuperNode speaks HTTPS with a root certificate only; it cannot present a
client certificate. The coordinator's Fleet edge requires one (mutual TLS from the
consortium CA), so the SuperNode talks plain HTTP to this forwarder on 127.0.0.1 and the
forwarder opens, per connection, a TLS connection to the edge that presents the
institution's certificate and key (bundle and state dir) and verifies the edge against
the consortium CA. It copies bytes both ways and parses nothing: the HTTP is the
SuperNode's, the checks are the edge's.

The SuperNode-to-forwarder hop is TLS with a local certificate, not plain HTTP: flwr
1.41 refuses SuperNode authentication (`--auth-supernode-private-key`) over an
`--insecure` channel (exit code 303), and every Fleet call must stay signed with the
onboarded SuperNode key. So `LocalTls.create` makes, per join, a throwaway local root
and a certificate for 127.0.0.1 in the state dir (key 0600); the SuperNode verifies the
forwarder with that root (`--root-certificates`). It guards nothing beyond the host:
the listener binds 127.0.0.1 only.

Every local user can reach 127.0.0.1, though, and a connection forwarded is one made
with the institution's certificate: another OS user of the site's host could hold the
institution's 32 connections at the edge (locking the site out of every federated job)
or have its abuse counted against the institution. So on Linux the forwarder forwards
only connections whose socket belongs to its own user (the kernel's socket table,
/proc/net/tcp), and closes others, logging them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from consortium import pki
from consortium.errors import UnreachableError
from consortium.net import is_wildcard_host, split_host_port
from consortium.tls import ClientTls

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT_S = 10.0
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
CHUNK_BYTES = 64 * 1024
LOCAL_CERT_DAYS = 365


def edge_target(fleet_address: str, coordinator_address: str) -> tuple[str, int]:
    """Where the edge is: the address the coordinator returned, with a wildcard host
    (an edge bound to all interfaces) replaced by the coordinator's own host."""
    host, port = split_host_port(fleet_address)
    if is_wildcard_host(host):
        host, _ = split_host_port(coordinator_address)
    return host.strip("[]"), port


@dataclass(frozen=True)
class LocalTls:
    """The forwarder's loopback certificate and the root the SuperNode verifies it with."""

    ca_cert: Path
    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path) -> LocalTls:
        """A fresh local root and a 127.0.0.1 server certificate (the root's key is
        not kept: nothing else is ever signed with it)."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tls = cls(directory / "local-ca.crt", directory / "local.crt", directory / "local.key")
        ca_key, key = pki.generate_key(), pki.generate_key()
        ca = pki.create_ca(ca_key, "Consortium site-local Fleet forwarder", LOCAL_CERT_DAYS)
        cert = pki.issue_server_certificate(ca_key, ca, key, [LOOPBACK], LOCAL_CERT_DAYS)
        pki.write_private_key(tls.key, key, force=True)  # a new one every join
        tls.ca_cert.write_bytes(pki.pem(ca))
        tls.cert.write_bytes(pki.pem(cert))
        return tls

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


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
    except (OSError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()


PROC_NET_TCP = Path("/proc/net/tcp")  # IPv4: the listener is 127.0.0.1 only


ESTABLISHED = "01"
TABLE_READS = 3


def loopback_peer_uid(peer_port: int, listen_port: int, table: Path = PROC_NET_TCP) -> int | None:
    """The uid owning the open socket 127.0.0.1:`peer_port` connected to 127.0.0.1:
    `listen_port`, from the kernel's socket table; None when it is not there.

    Only an established socket counts: one its process closed (orphaned, or in
    TIME_WAIT) is listed with uid 0, which would pass for a site running as root. The
    table is read a page at a time, and a row can be missed while other sockets come
    and go: a socket not found is looked for again."""
    # "sl local_address rem_address st ... uid ...": addresses are hex "0100007F:1F90"
    peer, listener = f"0100007F:{peer_port:04X}", f"0100007F:{listen_port:04X}"
    for _ in range(TABLE_READS):
        try:
            rows = table.read_text().splitlines()[1:]
        except OSError:
            return None
        for row in rows:
            fields = row.split()
            if len(fields) > 7 and (fields[1], fields[2], fields[3]) == (
                peer,
                listener,
                ESTABLISHED,
            ):
                return int(fields[7])
    return None


def from_own_user(writer: asyncio.StreamWriter) -> bool:
    """Whether the connection's other end belongs to this process's user. Outside Linux
    there is no socket table to ask: every loopback connection is taken."""
    if not sys.platform.startswith("linux"):
        return True
    peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
    if not peer or not local:
        return False
    return loopback_peer_uid(int(peer[1]), int(local[1])) == os.geteuid()


class FleetForwarder:
    """Listens on 127.0.0.1 (port 0: any free); forwards each connection to the edge
    over mutual TLS. `address` is what the SuperNode's `--superlink` gets."""

    def __init__(
        self, edge_host: str, edge_port: int, tls: ClientTls, local: LocalTls, port: int = 0
    ) -> None:
        self._edge = (edge_host, edge_port)
        self._context = client_ssl_context(tls)
        self.local = local
        self._local_context = local.server_context()
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
        self.port: int = int(self._server.sockets[0].getsockname()[1])
        log.info("Fleet forwarder on %s to the edge at %s:%d", self.address, *self._edge)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _run(self, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, LOOPBACK, port, ssl=self._local_context)
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
        if not from_own_user(local_w):
            log.warning(
                "Fleet forwarder: refused a connection from %s: another OS user's process "
                "(only this site's SuperNode may use the institution's certificate)",
                local_w.get_extra_info("peername"),
            )
            local_w.close()
            return
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
        except asyncio.CancelledError:
            # The forwarder is stopping. Not re-raised: asyncio would log the
            # cancelled connection handler as an error with a traceback.
            pass
        finally:
            for writer in (local_w, edge_w):
                writer.close()

    def stop(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STOP_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()
