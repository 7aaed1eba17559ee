"""TLS handshakes the control plane refused, read from gRPC's own log line.

Why this way: a client certificate from an unknown CA, an expired or a not-yet-valid one
is refused inside gRPC's C core during the handshake. No Python hook sees it
(interceptors run after the handshake; ``dynamic_ssl_server_credentials`` is called
before it, with no result). The core does write one line per refusal to the process's
stderr (fd 2), as grpcio 1.85 does by default::

    I1123 13:39:53.017820   28070 ssl_transport_security.cc:2563] Handshake failed with
    error SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:
    CERTIFICATE_VERIFY_FAILED: certificate has expired

(one line in the log). `StderrTee` passes fd 2 through a pipe, unchanged, and hands
each line to `ControlPlaneRefusalWatch`, which logs the refusal with its reason and counts it.

Limits: the line has no peer address; ``GRPC_VERBOSITY=ERROR`` or ``NONE`` would hide
it, so the `coordinator` command drops that variable before gRPC starts (see
`coordinator.cli`); and a failed *outbound* TLS handshake of this process would print
the same line (the coordinator makes none over gRPC).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.access.refusals.log import POLL_INTERVAL_S, RefusalLog

log = logging.getLogger(__name__)

CHANNEL = "control_plane"
UNTRUSTED = "untrusted_certificate"
EXPIRED = "expired_certificate"
NOT_YET_VALID = "not_yet_valid_certificate"
WRONG_PURPOSE = "wrong_certificate_purpose"
NO_CERTIFICATE = "no_client_certificate"
NOT_TLS = "not_tls"
REJECTED = "rejected_certificate"  # verification failed; the log does not say why
OTHER = "other"
REASONS = (UNTRUSTED, EXPIRED, NOT_YET_VALID, WRONG_PURPOSE, NO_CERTIFICATE, NOT_TLS, REJECTED)
PEER = "an unknown peer (gRPC does not log its address)"
_WHERE = {CHANNEL: "control plane", "ray": "Ray"}

_LINE = re.compile(
    r"Handshake failed with (?:fatal )?error (?P<ssl>\S+): "
    r"(?:error:[0-9a-fA-F]+:[^:]*:[^:]*:)?(?P<code>[A-Z0-9_]+)\.?(?:: (?P<detail>.*))?$"
)
# BoringSSL's verify messages (X509_verify_cert_error_string) for a rejected certificate.
_VERIFY = (
    ("certificate has expired", EXPIRED),
    ("certificate is not yet valid", NOT_YET_VALID),
    ("unsupported certificate purpose", WRONG_PURPOSE),
    ("unable to get local issuer certificate", UNTRUSTED),
    ("unable to get issuer certificate", UNTRUSTED),
    ("self signed certificate", UNTRUSTED),
    ("self-signed certificate", UNTRUSTED),
    ("certificate signature failure", UNTRUSTED),
)
_CODES = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": NO_CERTIFICATE,
    "WRONG_VERSION_NUMBER": NOT_TLS,
    "HTTP_REQUEST": NOT_TLS,
    "HTTPS_PROXY_REQUEST": NOT_TLS,
}
_EXPLAIN = {
    UNTRUSTED: "its certificate is not signed by this consortium's CA (another CA, or "
    "self-signed); the site must use the bundle from `coordinator onboard`",
    EXPIRED: "its certificate has expired; renew it with `coordinator renew NAME --csr FILE`",
    NOT_YET_VALID: "its certificate is not valid yet; check the site's and the "
    "coordinator's clocks",
    WRONG_PURPOSE: "its certificate is not for client use (no clientAuth usage); use "
    "the institution certificate from the bundle",
    NO_CERTIFICATE: "it presented no client certificate; pass the bundle's "
    "institution certificate and key",
    NOT_TLS: "it did not speak TLS (plain text gRPC or HTTP); mutual TLS is required",
    REJECTED: "its certificate failed verification (not from this consortium's CA, "
    "expired, or not for client use; the log does not say which); a node must use the "
    "certificate `client join` obtains",
    OTHER: "the TLS handshake failed",
}


@dataclass(frozen=True)
class TlsRefusal:
    reason: str  # one of REASONS or OTHER
    line: str  # gRPC's own line, for the log
    channel: str = CHANNEL
    peer: str = PEER

    def describe(self) -> str:
        where = _WHERE[self.channel]
        return f"{where}: refused a TLS handshake from {self.peer}: {_EXPLAIN[self.reason]}"

    def logged(self) -> str:
        return f"{self.describe()} (gRPC: {self.line})"

    def summary(self, repeats: int, seconds: float) -> str:
        return (
            f"{_WHERE[self.channel]}: refused {repeats} more TLS handshake(s) in "
            f"{seconds:.0f} s: {_EXPLAIN[self.reason].split(';')[0]}"
        )


def parse_handshake_failure(line: str) -> TlsRefusal | None:
    """The refusal a gRPC core log line records, or None."""
    found = _LINE.search(line)
    if found is None:
        return None
    detail = found.group("detail") or ""
    reason = _CODES.get(found.group("code"), OTHER)
    if found.group("code") == "CERTIFICATE_VERIFY_FAILED":
        reason = next((r for text, r in _VERIFY if text in detail), OTHER if detail else REJECTED)
    return TlsRefusal(reason, line[found.start() :].strip())


def parse_ray_handshake_failure(line: str) -> TlsRefusal | None:
    """A refused handshake in the Ray GCS's error log (Ray's gRPC prints no reason text
    for a failed verification: `rejected_certificate`)."""
    refusal = parse_handshake_failure(line)
    if refusal is None:
        return None
    return TlsRefusal(refusal.reason, refusal.line, "ray", "an unknown peer")


class StderrTee:
    """Passes this process's fd 2 through a pipe and hands every line to ``on_line``.

    Everything written to fd 2 (Python's stderr, logging, C libraries) still reaches the
    original stderr, unchanged and first. ``on_line`` runs on the pump thread: it must
    be quick and must not write to stderr (that is the pipe). If the pump fails, fd 2 is
    put back, so a writer can never block on a full pipe.
    """

    PIPE_BYTES = 1 << 20

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self._on_line = on_line
        self._saved: int | None = None
        self._read_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def install(self) -> None:
        sys.stderr.flush()
        read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError):  # a bigger pipe absorbs bursts; not essential
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, self.PIPE_BYTES)
        self._saved = os.dup(2)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._read_fd = read_fd
        self._thread = threading.Thread(target=self._pump, name="stderr-tee", daemon=True)
        self._thread.start()

    def uninstall(self) -> None:
        """Put the original stderr back; the pump drains what is left and ends."""
        sys.stderr.flush()
        self._restore()
        if self._thread is not None:
            self._thread.join(timeout=5)  # a child holding the pipe open keeps it alive

    def _restore(self) -> None:
        with self._lock:
            if self._saved is not None:
                os.dup2(self._saved, 2)  # drops the last write end of the pipe: EOF
                os.close(self._saved)
                self._saved = None

    def _pump(self) -> None:
        assert self._read_fd is not None and self._saved is not None
        saved, partial = os.dup(self._saved), b""
        try:
            while chunk := os.read(self._read_fd, 65536):
                _write_all(saved, chunk)
                *lines, partial = (partial + chunk).split(b"\n")
                for line in lines:
                    try:
                        self._on_line(line.decode(errors="replace"))
                    except Exception:  # never let a handler stop the pump
                        _write_all(saved, b"stderr tee: a line handler failed\n")
        except OSError:
            self._restore()
        finally:
            os.close(self._read_fd)
            os.close(saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class ControlPlaneRefusalWatch:
    """Logs and counts the control plane's refused TLS handshakes (see the module doc)."""

    def __init__(self, on_refusal: Callable[[TlsRefusal], None] | None = None) -> None:
        self._on_refusal = on_refusal
        self._log = RefusalLog()
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._tee = StderrTee(self._take)
        self._thread = threading.Thread(target=self._run, name="tls-refusal-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._tee.install()

    def stop(self) -> None:
        self._tee.uninstall()
        self._lines.put(None)
        self._thread.join()
        self._log.flush(everything=True)

    def _take(self, line: str) -> None:
        # On the pump thread: only a cheap filter, the rest happens on our own thread
        # (whose log lines go back through the pipe the pump drains).
        if "Handshake failed" in line:
            self._lines.put(line)

    def _run(self) -> None:
        while True:
            try:
                line = self._lines.get(timeout=POLL_INTERVAL_S)
            except queue.Empty:
                self._log.flush()  # summaries of bursts whose window has closed
                continue
            if line is None:
                return
            try:
                refusal = parse_handshake_failure(line)
                if refusal is None:
                    continue
                if self._on_refusal is not None:
                    self._on_refusal(refusal)
                self._log.add(refusal)
            except Exception:  # a watcher must never take the coordinator down
                log.exception("handling a refused TLS handshake failed")
