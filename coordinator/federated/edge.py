"""The Fleet edge: the sites' only door to the Flower SuperLink.

Why it exists: flwr 1.41's SuperLink serves its Fleet, Control and Runtime APIs on one
HTTPS port and asks callers for no client certificate, so anyone who can reach that
port and holds the public CA certificate can list runs, register SuperNodes, or
`flwr run` an app of their own. The SuperLink therefore listens on loopback only, and
the sites reach this edge instead::

    site SuperNode -> site forwarder ==mTLS==> FleetEdge --HTTPS--> SuperLink (127.0.0.1)
                                               |
                                               +- refuses: no/untrusted certificate
                                                  (handshake); a revoked, superseded or
                                                  unknown certificate, any path but
                                                  /v1/fleet/<name> (403); a body over
                                                  MAX_BODY_BYTES (413)

How: uvicorn serves a small ASGI app that forwards with httpx. uvicorn does not hand
the ASGI app the peer's certificate, so the TLS handshake is done here, per connection,
with `loop.start_tls` (Python's ssl module: CERT_REQUIRED against the consortium CA),
and only then is the connection given to uvicorn's own h11 protocol; this also lets the
edge see, log and count every refused handshake, which asyncio otherwise drops
silently. The institution (the certificate's common name) rides in the ASGI scope.
The certificate is checked (revocation, the serial on record) right after the
handshake, before the connection counts toward its institution's cap, so no stale or
foreign certificate bearing an institution's name can take that institution's places;
and again on every request, so a revoked site's open connection stops working at once.
A connection must send each request's head within REQUEST_HEAD_TIMEOUT_S, and the edge
buffers at most MAX_BODY_BYTES of a body (it forwards each body whole), so neither idle
connections nor endless bodies can hold the edge's sockets or the memory of `coordinator
serve`, the process that holds the signing key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NamedTuple

import h11
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Mount
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from consortium.errors import ChildProcessFailedError
from consortium.tls import ServerTls

log = logging.getLogger(__name__)

CHANNEL = "fleet"
NO_CERTIFICATE = "no_client_certificate"
UNTRUSTED = "untrusted_certificate"
EXPIRED = "expired_certificate"
NOT_YET_VALID = "not_yet_valid_certificate"
WRONG_PURPOSE = "wrong_certificate_purpose"
NOT_TLS = "not_tls"
TOO_MANY_HANDSHAKES = "too_many_handshakes"
TOO_MANY_CONNECTIONS = "too_many_connections"
REVOKED = "revoked_certificate"
SUPERSEDED = "superseded_certificate"
UNKNOWN_CERTIFICATE = "unknown_certificate"
FORBIDDEN_API = "forbidden_api"
BODY_TOO_LARGE = "body_too_large"
REQUEST_TIMEOUT = "request_timeout"
OTHER = "other"

# Fleet calls are POSTs to /v1/fleet/<kebab-case name> (flwr/superlink/routers/fleet/
# router.py). Nothing else passes: no dots, slashes, percent-escapes or query, so no
# path normalization downstream (httpx resolves "..") can turn one into another API.
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z0-9-]{0,63}")
INSTITUTION_KEY = "consortium.institution"  # ASGI scope keys set per connection
SERIAL_KEY = "consortium.certificate_serial"
REFUSAL_KEY = "consortium.refusal"  # a connection's certificate, refused after its handshake
HANDSHAKE_TIMEOUT_S = 10.0
# A site's SuperNode (httpx) writes a request as soon as its connection is open (with
# TLS 1.3, right behind its Finished): its head, under 1 KiB, takes one round trip
# (80 ms on the WAN test bed). 10 s covers a congested link and three lost segments
# (TCP retransmits after 1, 2 and 4 s) yet frees at once the place of a connection
# opened only to be held. It runs from a connection's start, and from the first byte
# of each later request (uvicorn's keep-alive timer stops there).
REQUEST_HEAD_TIMEOUT_S = 10.0
# The largest request Flower sends is a push-object of one ArrayChunk: every array is
# cut into chunks of FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE (5 MiB in flwr 1.41:
# flwr/common/constant.py, used by flwr/app/message/array.py), pushed with an object
# header and a few protobuf fields (about 200 bytes more). Every other object (Array,
# ArrayRecord, ConfigRecord, MetricRecord, Message) and push-messages' object tree is
# metadata: kilobytes. 8 MiB leaves 3 MiB of room and bounds what one institution's
# MAX_CONNECTIONS_PER_INSTITUTION connections make the edge buffer at 256 MiB. Check it
# when upgrading flwr (tests/security/test_fleet_edge_limits.py pushes the largest).
MAX_BODY_BYTES = 8 * 1024 * 1024
UPSTREAM_TIMEOUT_S = 300.0  # a push-object of a large model may take a while
# How long a site's idle connection stays open (uvicorn's default: 5 s). A site is
# silent while it trains, and a connection closed meanwhile costs its reply a TCP and a
# TLS handshake (two round trips); the site's SuperNode keeps its side for less
# (client/federated/fast_poll_supernode.py, KEEP_ALIVE_S).
EDGE_KEEP_ALIVE_S = 120
# Caps on what one party holds open, so no one exhausts the edge's sockets and keeps
# the sites out. A site's own handshakes take milliseconds, but anyone who reaches the
# port can start them, and each waits up to HANDSHAKE_TIMEOUT_S: one address gets this
# many at once (room for several sites behind one NAT, each opening a dozen at once),
# counting those whose certificate was refused after the handshake until they close.
# After its handshake a connection with a current certificate belongs to an
# institution; a site's SuperNode holds a handful (its polls, heartbeats and up to 8
# object transfers at once: client/federated/fast_poll_supernode.py), each kept
# EDGE_KEEP_ALIVE_S when idle, so an institution gets this many open at once. Beyond
# either, a new connection is closed at once, logged and counted; those already open
# are untouched.
MAX_HANDSHAKES_PER_ADDRESS = 64
MAX_CONNECTIONS_PER_INSTITUTION = 32
STOP_TIMEOUT_S = 5.0
# Per-connection headers (RFC 9110 section 7.6.1) and those the SuperLink's uvicorn
# would believe about the peer (it trusts X-Forwarded-* from 127.0.0.1: us).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        "accept-encoding",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
    }
)
_VERIFY_MESSAGES = (
    ("certificate has expired", EXPIRED),
    ("certificate is not yet valid", NOT_YET_VALID),
    ("unsupported certificate purpose", WRONG_PURPOSE),
    ("unable to get local issuer certificate", UNTRUSTED),
    ("self-signed certificate", UNTRUSTED),
    ("self signed certificate", UNTRUSTED),
    ("certificate signature failure", UNTRUSTED),
)
_SSL_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": NO_CERTIFICATE,
    "HTTP_REQUEST": NOT_TLS,
    "WRONG_VERSION_NUMBER": NOT_TLS,
    "UNSUPPORTED_PROTOCOL": NOT_TLS,
}


class EdgeStartError(ChildProcessFailedError):
    """The edge could not listen (its port taken, its certificate unreadable)."""


RefusalHook = Callable[[str, str], None]  # (reason, institution or "")


def handshake_refusal_reason(error: BaseException) -> str:
    """The `consortium_auth_refusals_total` reason for a failed TLS handshake."""
    if isinstance(error, ssl.SSLCertVerificationError):
        message = (error.verify_message or "").lower()
        return next((reason for text, reason in _VERIFY_MESSAGES if text in message), UNTRUSTED)
    if isinstance(error, ssl.SSLError):
        return _SSL_REASONS.get(error.reason or "", OTHER)
    return OTHER


def institution_of_peercert(peercert: dict[str, Any] | None) -> str:
    """The common name in `SSLObject.getpeercert()`'s subject, or ""."""
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def serial_of_peercert(peercert: dict[str, Any] | None) -> str:
    """The certificate's serial as the state store writes it (lower-case hex, no
    leading zeros), or ""."""
    text = str((peercert or {}).get("serialNumber", ""))
    try:
        return format(int(text, 16), "x")
    except ValueError:
        return ""


def server_ssl_context(tls: ServerTls) -> ssl.SSLContext:
    """Mutual TLS: a client certificate from the consortium CA is required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca_cert))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _Refusals:
    """Logs and counts each refusal, with the institution or "no certificate"."""

    def __init__(self, on_refusal: RefusalHook | None) -> None:
        self._on_refusal = on_refusal

    def refuse(self, reason: str, institution: str, peer: str, detail: str) -> None:
        who = institution or "no certificate"
        log.warning("Fleet edge refused %s (%s) from %s: %s", who, reason, peer, detail)
        if self._on_refusal is not None:
            self._on_refusal(reason, institution)


class _Refusal(NamedTuple):
    reason: str
    detail: str  # for the log
    answer: str  # the 403's body, for the site's operator


class _Identity:
    """Whether a certificate may use the Fleet API: asked once a connection's handshake
    is done and again on every request. Blocking (the state store): run in a thread."""

    def __init__(
        self, is_revoked: Callable[[str], bool], current_serial: Callable[[str], str | None]
    ) -> None:
        self._is_revoked = is_revoked
        self._current_serial = current_serial

    def refusal(self, institution: str, serial: str) -> _Refusal | None:
        if self._is_revoked(institution):
            return _Refusal(
                REVOKED,
                "its certificate has been revoked",
                f"the certificate of {institution!r} is revoked\n",
            )
        current = self._current_serial(institution)
        if current is None:
            # Onboarding records the serial of every certificate it issues an
            # institution, and only institutions use the Fleet API. The CA signs others
            # (the coordinator's Ray certificate, whose key the sandboxed Ray head and
            # drivers hold; the operator's): none of them may pass.
            return _Refusal(
                UNKNOWN_CERTIFICATE,
                f"no certificate of {institution!r} is on record (serial {serial})",
                f"the certificate of {institution!r} is not an onboarded institution's\n",
            )
        # A renewal supersedes the institution's earlier certificates (as on the
        # control plane: coordinator/api/auth.py), and certificates issued under its
        # name for other uses (its Ray nodes') never pass.
        if serial != current:
            return _Refusal(
                SUPERSEDED,
                f"its certificate (serial {serial}) is not its current one (a renewal, or "
                "one issued for another use)",
                f"the certificate of {institution!r} was replaced by a renewal; "
                "use the renewed bundle\n",
            )
        return None


class _FleetProxy:
    """The ASGI app: checks each request, forwards Fleet calls, refuses the rest."""

    def __init__(
        self, upstream: str, ca_cert: Path, identity: _Identity, refusals: _Refusals
    ) -> None:
        self._upstream = upstream
        self._ca_cert = ca_cert
        self._identity = identity
        self._refusals = refusals
        self._client: httpx.AsyncClient | None = None
        self.app = Starlette(routes=[Mount("/", app=self._handle)], lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        # The SuperLink's certificate is from the consortium CA, for 127.0.0.1.
        verify = ssl.create_default_context(cafile=str(self._ca_cert))
        async with httpx.AsyncClient(
            base_url=f"https://{self._upstream}",
            verify=verify,
            timeout=UPSTREAM_TIMEOUT_S,
        ) as client:
            self._client = client
            yield
        self._client = None

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        institution = str(scope.get(INSTITUTION_KEY, ""))
        peer = f"{request.client.host}:{request.client.port}" if request.client else "?"
        serial = str(scope.get(SERIAL_KEY, ""))
        refused = scope.get(REFUSAL_KEY)  # decided after the handshake, and counted there
        try:
            response = await self._decide(request, institution, serial, peer, refused)
        except ClientDisconnect:
            return  # it closed the connection while sending a body: no one to answer
        await response(scope, receive, send)

    async def _decide(
        self,
        request: Request,
        institution: str,
        serial: str,
        peer: str,
        refused: _Refusal | None,
    ) -> Response:
        if not institution:  # cannot happen behind the handshake; refuse all the same
            self._refusals.refuse(NO_CERTIFICATE, "", peer, request.url.path)
            return Response("a client certificate is required\n", status_code=403)
        if refused is None:
            refused = await run_in_threadpool(self._identity.refusal, institution, serial)
            if refused is not None:
                self._refusals.refuse(refused.reason, institution, peer, refused.detail)
        if refused is not None:
            # Closed after the answer: a connection no longer admitted holds no place.
            return Response(refused.answer, status_code=403, headers={"connection": "close"})
        raw_path = request.scope.get("raw_path", b"").decode("latin-1")
        if (
            request.method != "POST"
            or not FLEET_PATH.fullmatch(raw_path)
            or request.url.query
            or raw_path != request.url.path
        ):
            self._refusals.refuse(
                FORBIDDEN_API,
                institution,
                peer,
                f"{request.method} {raw_path or request.url.path}: only Fleet API calls "
                "(POST /v1/fleet/...) pass the edge",
            )
            return Response("only the Flower Fleet API is served here\n", status_code=403)
        body = await _body_within(request, MAX_BODY_BYTES)
        if body is None:
            self._refusals.refuse(
                BODY_TOO_LARGE,
                institution,
                peer,
                f"{raw_path}: a body over {MAX_BODY_BYTES} bytes (the largest Flower sends is "
                "one array chunk of 5 MiB)",
            )
            # Closed after the answer: the rest of the body is never read.
            return Response(
                f"a request body may not exceed {MAX_BODY_BYTES} bytes\n",
                status_code=413,
                headers={"connection": "close"},
            )
        return await self._forward(request, raw_path, peer, body)

    async def _forward(self, request: Request, path: str, peer: str, body: bytes) -> Response:
        assert self._client is not None, "the edge's upstream client is not open"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["x-forwarded-for"] = peer.rsplit(":", 1)[0]
        headers["accept-encoding"] = "identity"
        try:
            upstream = await self._client.post(path, content=body, headers=headers)
        except httpx.HTTPError as error:
            log.warning("Fleet edge: the SuperLink did not answer %s: %s", path, error)
            return Response("the SuperLink is unavailable\n", status_code=502)
        return Response(
            upstream.content,
            status_code=upstream.status_code,
            headers={k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP},
        )


async def _body_within(request: Request, limit_bytes: int) -> bytes | None:
    """The request's body, or None as soon as it is known to exceed `limit_bytes`: by
    its Content-Length before a byte is read, or by counting a chunked one as it comes
    (uvicorn stops reading from the socket while 64 KiB of it wait here)."""
    declared = request.headers.get("content-length")
    if declared is not None and int(declared) > limit_bytes:  # h11 checked it is digits
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit_bytes:
            return None
    return bytes(body)


class _GateConfig:
    """What every `_TlsGate` of one edge shares (uvicorn builds the protocol itself),
    including the counts its caps are checked against (only the edge's event loop
    thread touches them)."""

    def __init__(
        self,
        context: ssl.SSLContext,
        refusals: _Refusals,
        identity: _Identity,
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


class _CountedH11(H11Protocol):
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


class _Held(asyncio.Protocol):
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


def _gate_class(gate: _GateConfig) -> type[asyncio.Protocol]:
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
            held = _Held()
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
            http = _CountedH11(
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


class _EdgeServer(uvicorn.Server):
    """uvicorn's server, telling a waiting thread when it listens."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self._ready.set()


class FleetEdge:
    """The mutual-TLS listener in front of the loopback SuperLink's Fleet API.

    `host:port` is what sites connect to (port 0: any free); `upstream` the SuperLink's
    loopback address; `is_revoked(institution)` and `current_serial(institution)` (the
    serial of its latest certificate; None if the consortium issued it none: refused)
    are asked after each handshake and on every request;
    `on_refusal(reason, institution)` counts each refusal. One peer address gets at
    most `max_handshakes_per_address` connections in their TLS handshake (or refused
    after it) at once, one institution at most `max_connections_per_institution` open;
    a connection sending no request head for `request_head_timeout_s` is closed.
    """

    def __init__(
        self,
        host: str,
        port: int,
        upstream: str,
        tls: ServerTls,
        is_revoked: Callable[[str], bool],
        current_serial: Callable[[str], str | None],
        on_refusal: RefusalHook | None = None,
        start_timeout_s: float = 30.0,
        max_handshakes_per_address: int = MAX_HANDSHAKES_PER_ADDRESS,
        max_connections_per_institution: int = MAX_CONNECTIONS_PER_INSTITUTION,
        request_head_timeout_s: float = REQUEST_HEAD_TIMEOUT_S,
    ) -> None:
        refusals = _Refusals(on_refusal)
        identity = _Identity(is_revoked, current_serial)
        proxy = _FleetProxy(upstream, tls.ca_cert, identity, refusals)
        gate = _GateConfig(
            server_ssl_context(tls),
            refusals,
            identity,
            max_handshakes_per_address,
            max_connections_per_institution,
            request_head_timeout_s,
        )
        self._gate = gate
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError:
            self._socket.close()
            raise
        self.host = host
        self.port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(
            proxy.app,
            http=_gate_class(gate),
            lifespan="on",
            # Python's own asyncio (not uvloop): `start_tls` and transports as documented.
            loop="asyncio",
            log_level="warning",
            access_log=False,
            proxy_headers=False,  # the peer is the TCP peer, whatever a header says
            server_header=False,
            timeout_keep_alive=EDGE_KEEP_ALIVE_S,
            ws="none",  # Fleet calls are POSTs: no WebSocket upgrade is served
        )
        self._ready = threading.Event()
        self._server = _EdgeServer(config, self._ready)
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="fleet-edge", daemon=True)
        self._thread.start()
        self._ready.wait(start_timeout_s)
        if not self._server.started or self._failure is not None:
            self.stop()
            raise EdgeStartError(
                f"the Fleet edge did not start on {self.address}: "
                f"{self._failure or 'see the log above'}"
            )
        log.info("Fleet edge on %s (mutual TLS) forwarding to %s", self.address, upstream)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as error:  # raised by __init__
            self._failure = error
        finally:
            self._ready.set()  # `startup` may never have run: wake `__init__` anyway

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(STOP_TIMEOUT_S)
        self._socket.close()
