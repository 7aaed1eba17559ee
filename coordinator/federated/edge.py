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

How: uvicorn serves a small ASGI app (`_FleetProxy`, here) that forwards with httpx,
behind a connection gate (edge_gate.py) that does each connection's TLS handshake
itself, since uvicorn does not hand the ASGI app the peer's certificate, and counts and
logs every refused one; who a certificate is and whether it may pass is edge_identity.py.
The institution (the certificate's common name) rides in the ASGI scope.
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

import contextlib
import logging
import re
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Mount
from starlette.types import Receive, Scope, Send

from consortium.errors import ChildProcessFailedError
from consortium.tls import ServerTls
from coordinator.federated.edge_gate import GateConfig, gate_class
from coordinator.federated.edge_identity import (
    BODY_TOO_LARGE,
    FORBIDDEN_API,
    INSTITUTION_KEY,
    NO_CERTIFICATE,
    REFUSAL_KEY,
    SERIAL_KEY,
    Identity,
    Refusal,
    RefusalHook,
    Refusals,
    server_ssl_context,
)

log = logging.getLogger(__name__)

# Fleet calls are POSTs to /v1/fleet/<kebab-case name> (flwr/superlink/routers/fleet/
# router.py). Nothing else passes: no dots, slashes, percent-escapes or query, so no
# path normalization downstream (httpx resolves "..") can turn one into another API.
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z0-9-]{0,63}")
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


class EdgeStartError(ChildProcessFailedError):
    """The edge could not listen (its port taken, its certificate unreadable)."""


class _FleetProxy:
    """The ASGI app: checks each request, forwards Fleet calls, refuses the rest."""

    def __init__(
        self, upstream: str, ca_cert: Path, identity: Identity, refusals: Refusals
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
        refused: Refusal | None,
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
        refusals = Refusals(on_refusal)
        identity = Identity(is_revoked, current_serial)
        proxy = _FleetProxy(upstream, tls.ca_cert, identity, refusals)
        gate = GateConfig(
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
            http=gate_class(gate),
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
