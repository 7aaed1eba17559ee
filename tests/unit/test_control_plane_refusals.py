"""Refused TLS handshakes: gRPC's log line parsed, fd 2 teed, logged and counted."""

from __future__ import annotations

import logging
import os
import threading

import pytest
from prometheus_client import CollectorRegistry

from coordinator.access.refusals.control_plane import (
    EXPIRED,
    NO_CERTIFICATE,
    NOT_TLS,
    NOT_YET_VALID,
    OTHER,
    UNTRUSTED,
    WRONG_PURPOSE,
    ControlPlaneRefusalWatch,
    StderrTee,
    parse_handshake_failure,
)
from coordinator.observability.metrics import CoordinatorMetrics

# As grpcio 1.85.1 writes them on the server side (tests/integration/test_onboarding.py
# provokes the first three and the plain-text one against a real coordinator).
PREFIX = "I1123 13:39:53.017820   28070 ssl_transport_security.cc:2563] "
VERIFY = "Handshake failed with error SSL_ERROR_SSL: error:1000007d:SSL routines:"
LINES = {
    UNTRUSTED: f"{PREFIX}{VERIFY}OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get "
    "local issuer certificate",
    EXPIRED: f"{PREFIX}{VERIFY}OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired",
    NOT_YET_VALID: f"{PREFIX}{VERIFY}OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate "
    "is not yet valid",
    WRONG_PURPOSE: f"{PREFIX}{VERIFY}OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unsupported "
    "certificate purpose",
    NO_CERTIFICATE: f"{PREFIX}Handshake failed with error SSL_ERROR_SSL: error:100000c7:SSL "
    "routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid certificate "
    "verification context",
    NOT_TLS: f"{PREFIX}Handshake failed with error SSL_ERROR_SSL: error:100000f7:SSL "
    "routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context",
}


@pytest.mark.parametrize("reason", sorted(LINES))
def test_each_kind_of_refusal_is_recognised(reason: str) -> None:
    refusal = parse_handshake_failure(LINES[reason])
    assert refusal is not None
    assert (refusal.channel, refusal.reason) == ("control_plane", reason)
    assert refusal.line.startswith("Handshake failed")
    assert "control plane: refused a TLS handshake" in refusal.logged()


def test_self_signed_certificate_is_untrusted_and_unknown_text_is_other() -> None:
    self_signed = LINES[EXPIRED].replace("certificate has expired", "self signed certificate")
    assert parse_handshake_failure(self_signed).reason == UNTRUSTED  # type: ignore[union-attr]
    odd = LINES[EXPIRED].replace("certificate has expired", "something new")
    assert parse_handshake_failure(odd).reason == OTHER  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "line", ["", "I1123 ... chttp2_transport.cc:123] ping", "Handshake succeeded", "Handshake"]
)
def test_other_lines_are_not_refusals(line: str) -> None:
    assert parse_handshake_failure(line) is None


def test_tee_passes_stderr_through_and_hands_over_each_line(
    capfd: pytest.CaptureFixture[str],
) -> None:
    seen: list[str] = []
    got_both = threading.Event()

    def take(line: str) -> None:
        seen.append(line)
        if len(seen) == 2:
            got_both.set()

    tee = StderrTee(take)
    tee.install()
    try:
        os.write(2, b"first line\nsecond ")
        os.write(2, b"line\n")
        assert got_both.wait(10)
    finally:
        tee.uninstall()
    assert seen == ["first line", "second line"]
    assert capfd.readouterr().err == "first line\nsecond line\n"
    os.write(2, b"after\n")  # fd 2 is the original again
    assert capfd.readouterr().err == "after\n"


def test_watch_logs_and_counts_a_refusal_written_to_fd_2(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    metrics = CoordinatorMetrics(CollectorRegistry())
    counted = threading.Event()

    def count(refusal: object) -> None:
        metrics.auth_refused("control_plane", refusal.reason)  # type: ignore[attr-defined]
        counted.set()

    watch = ControlPlaneRefusalWatch(on_refusal=count)
    with caplog.at_level(logging.WARNING):
        watch.start()
        try:
            os.write(2, (LINES[EXPIRED] + "\n").encode())
            assert counted.wait(10)
        finally:
            watch.stop()
    labels = {"channel": "control_plane", "reason": EXPIRED}
    assert metrics.registry.get_sample_value("consortium_auth_refusals_total", labels) == 1
    assert any("certificate has expired; renew it" in r.getMessage() for r in caplog.records)
    assert LINES[EXPIRED] in capfd.readouterr().err  # still on stderr, unchanged
