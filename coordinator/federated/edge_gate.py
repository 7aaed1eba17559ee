"""The Fleet edge's connection gate: a TCP connection becomes an HTTP one only after
its TLS handshake, its certificate's check and its institution's cap.

uvicorn does not hand the ASGI app the peer's certificate, so the handshake is done
here, per connection, with `loop.start_tls` (Python's ssl module: CERT_REQUIRED against
the consortium CA), and only then is the connection given to uvicorn's own h11 protocol
(`CountedH11`); this also lets the edge see, log and count every refused handshake,
which asyncio otherwise drops silently. The certificate is checked (revocation, the
serial on record) right after the handshake, before the connection counts toward its
institution's cap, so no stale or foreign certificate bearing an institution's name can
take that institution's places. A connection must send each request's head within the
edge's request-head timeout.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from coordinator.federated.edge_identity import (
    INSTITUTION_KEY,
    REFUSAL_KEY,
    REQUEST_TIMEOUT,
    SERIAL_KEY,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_HANDSHAKES,
    Identity,
    Refusals,
    handshake_refusal_reason,
    institution_of_peercert,
    serial_of_peercert,
)

log = logging.getLogger("coordinator.federated.edge")

HANDSHAKE_TIMEOUT_S = 10.0


class GateConfig:
    """What every `_TlsGate` of one edge shares (uvicorn builds the protocol itself),
    including the counts its caps are checked against (only the edge's event loop
    thread touches them)."""

    def __init__(
        self,
        context: ssl.SSLContext,
        refusals: Refusals,
        identity: Identity,
        max_handshakes_per_address: int,
        max_connections_per_institution: int,
        request_head_timeout_s: float,
    ) -> None:
        self.context = context
        self.refusals = refusals
        self.identity = identity
        self.tasks: set[asyncio.Task[None]] = set()
        self.max_handshakes_per_address = max_handshakes_per_address
        self.max_connections_per_institution = max_connections_per_institution
        self.request_head_timeout_s = request_head_timeout_s
        # by peer address: in their handshake, or refused after it until they close
        self.handshaking: Counter[str] = Counter()
        self.open: Counter[str] = Counter()  # by institution, admitted after the handshake

    @staticmethod
    def release(counts: Counter[str], key: str) -> None:
        counts[key] -= 1
        if counts[key] <= 0:
            del counts[key]


class CountedH11(H11Protocol):
    """uvicorn's h11 protocol for one connection after its handshake; tells the gate
    when the connection ends, however it ends (the site's close, a timer, a stop), and
    closes it when a request's head does not arrive within `head_timeout_s`: of the
    connection's start (uvicorn arms no timer before a first response) or of the first
    byte of a later request (that byte stops uvicorn's keep-alive timer)."""

    def __init__(
        self,
        *,
        on_lost: Callable[[], None],
        head_timeout_s: float,
        on_no_head: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._on_lost: Callable[[], None] | None = on_lost
        self._head_timeout_s = head_timeout_s
        self._on_no_head = on_no_head
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self._head_timeout_s, self._no_head)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._head_timer = self.loop.call_later(self._head_timeout_s, self._no_head)
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's head arrived: its cycle began
            self._stop_head_timer()

    def _no_head(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._on_no_head()
            self.transport.abort()  # nothing is owed to a peer that sent no request

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        try:
            super().connection_lost(exc)
        finally:
            on_lost, self._on_lost = self._on_lost, None
            if on_lost is not None:  # once, should the transport report it twice
                on_lost()


class Held(asyncio.Protocol):
    """Holds what arrives on a fresh TLS connection until its real protocol takes over."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def hand_over(self, protocol: asyncio.Protocol) -> None:
        for chunk in self.chunks:
            protocol.data_received(chunk)
        self.chunks.clear()
        if self.eof:
            protocol.eof_received()


def send_without_delay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle's algorithm off on the connection's socket. uvicorn writes a response's
    headers and its body separately, and with Nagle on the body waits for the site's
    acknowledgement of the headers: one more round trip for every Fleet call (measured
    behind the WAN test bed's 80 ms: 15 to 20 calls per federated pretraining step, each
    80 ms longer). asyncio turns Nagle off itself only on sockets made with
    IPPROTO_TCP, and the edge binds its own."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def gate_class(gate: GateConfig) -> type[asyncio.Protocol]:
    class _TlsGate(asyncio.Protocol):
        """A plain TCP connection until its TLS handshake succeeds; then uvicorn's h11
        protocol takes over the TLS transport, with the peer's institution in scope."""

        def __init__(
            self,
            config: uvicorn.Config,
            server_state: Any,
            app_state: Any,
            _loop: asyncio.AbstractEventLoop | None = None,
        ) -> None:
            self._config = config
            self._server_state = server_state
            self._app_state = app_state

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            peername = transport.get_extra_info("peername") or ("?", 0)
            address, peer = str(peername[0]), f"{peername[0]}:{peername[1]}"
            if gate.handshaking[address] >= gate.max_handshakes_per_address:
                # Counted before the close: whoever sees the close finds it counted.
                gate.refusals.refuse(
                    TOO_MANY_HANDSHAKES,
                    "",
                    peer,
                    f"{gate.handshaking[address]} connections from {address} are still in "
                    "their TLS handshake",
                )
                transport.abort()
                return
            gate.handshaking[address] += 1
            send_without_delay(transport)
            # Not one byte may reach this protocol: the ClientHello is for start_tls.
            transport.pause_reading()
            task = asyncio.get_running_loop().create_task(self._upgrade(transport, address, peer))
            gate.tasks.add(task)
            task.add_done_callback(gate.tasks.discard)
            task.add_done_callback(lambda _: gate.release(gate.handshaking, address))

        async def _upgrade(self, transport: asyncio.Transport, address: str, peer: str) -> None:
            # Bytes decrypted before uvicorn's protocol is attached (a TLS 1.3 client sends
            # its request with its Finished) wait here, then go to it in order.
            held = Held()
            try:
                tls = await asyncio.get_running_loop().start_tls(
                    transport,
                    held,
                    gate.context,
                    server_side=True,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
                )
            except (TimeoutError, OSError) as error:
                transport.close()
                if isinstance(error, (ssl.SSLError, asyncio.TimeoutError)):
                    gate.refusals.refuse(
                        handshake_refusal_reason(error), "", peer, f"TLS handshake: {error}"
                    )
                return
            if tls is None or held.lost:  # the connection closed meanwhile
                return
            peercert = tls.get_extra_info("peercert")
            institution = institution_of_peercert(peercert)
            serial = serial_of_peercert(peercert)
            # Checked before the connection counts toward its institution's cap: a
            # certificate with its name but not its current serial (one a renewal
            # replaced, its Ray nodes') could otherwise hold all its places.
            try:
                refused = await asyncio.to_thread(gate.identity.refusal, institution, serial)
            except Exception:  # the state store failed: the site's SuperNode retries
                log.exception("Fleet edge: could not check the certificate of %r", institution)
                tls.abort()
                return
            if held.lost:
                return
            if refused is not None:
                gate.refusals.refuse(refused.reason, institution, peer, refused.detail)
                # It gets its 403 (a renewed site's operator reads why), then is closed;
                # until then it counts with its address's handshakes, not its institution.
                gate.handshaking[address] += 1
                counts, key = gate.handshaking, address
            elif gate.open[institution] >= gate.max_connections_per_institution:
                gate.refusals.refuse(
                    TOO_MANY_CONNECTIONS,
                    institution,
                    peer,
                    f"it holds {gate.open[institution]} connections to the edge already",
                )
                tls.abort()
                return
            else:
                gate.open[institution] += 1
                counts, key = gate.open, institution
            timeout_s = gate.request_head_timeout_s
            http = CountedH11(
                config=self._config,
                server_state=self._server_state,
                app_state=self._app_state,
                on_lost=lambda: gate.release(counts, key),
                head_timeout_s=timeout_s,
                on_no_head=lambda: gate.refusals.refuse(
                    REQUEST_TIMEOUT, institution, peer, f"no request head within {timeout_s} s"
                ),
            )
            inner = http.app

            async def identified(scope: Scope, receive: Receive, send: Send) -> None:
                scope[INSTITUTION_KEY] = institution
                scope[SERIAL_KEY] = serial
                scope[REFUSAL_KEY] = refused
                await inner(scope, receive, send)

            http.app = identified
            tls.set_protocol(http)
            http.connection_made(tls)
            held.hand_over(http)

    return _TlsGate
