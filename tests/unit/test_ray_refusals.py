"""Reading Ray's GCS log for token refusals: parsing, following, logging, counting."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from coordinator.access.refusals.ray_gcs import (
    INVALID_TOKEN,
    MISSING_TOKEN,
    UNKNOWN_PEER,
    LogFollower,
    RayRefusal,
    RayRefusalWatch,
    RefusalLog,
    gcs_log_path,
    parse_ray_refusal,
)
from coordinator.observability.metrics import CoordinatorMetrics

# MISSING as a real Ray 2.60 head wrote it; the syncer lines carry the messages of Ray's
# ray_syncer source (file and line numbers made up; the parser does not read them).
MISSING = (
    "[2026-11-23 10:56:49,031 W 10352 10382] (gcs_server) server_call.h:384: "
    "Missing authorization header in request!"
)
SYNCER_MISSING = (
    "[2026-11-23 10:57:01,000 W 10352 10382] (gcs_server) ray_syncer_bidi_reactor.cc:71: "
    "Missing authorization header in syncer connection from node 2744e5acee"
)
SYNCER_INVALID = (
    "[2026-11-23 10:57:02,000 W 10352 10382] (gcs_server) ray_syncer_bidi_reactor.cc:80: "
    "Invalid bearer token in syncer connection from node c15f3033ee"
)
UNRELATED = (
    "[2026-11-23 10:56:33,680 I 10352 10368] (gcs_server) gcs_node_manager.cc:111: "
    "Registering new node. node_id=b5c67328"
)


def test_missing_token_line_is_a_refusal_from_an_unknown_peer() -> None:
    refusal = parse_ray_refusal(MISSING)
    assert refusal == RayRefusal(MISSING_TOKEN, UNKNOWN_PEER, MISSING)
    assert "no token" in refusal.describe() and "RAY_AUTH_MODE=token" in refusal.describe()


def test_syncer_lines_name_the_node_and_the_reason() -> None:
    missing, invalid = parse_ray_refusal(SYNCER_MISSING), parse_ray_refusal(SYNCER_INVALID)
    assert missing is not None and invalid is not None
    assert (missing.reason, missing.peer) == (MISSING_TOKEN, "node 2744e5acee")
    assert (invalid.reason, invalid.peer) == (INVALID_TOKEN, "node c15f3033ee")
    assert "wrong token" in invalid.describe()


@pytest.mark.parametrize(
    "line",
    [
        UNRELATED,
        "Wrong cluster ID token in request! Expected: 01, got: 02",
        "Expected cluster ID in server call!",
        "",
    ],
)
def test_other_lines_are_not_refusals(line: str) -> None:
    assert parse_ray_refusal(line) is None


def _session(temp_dir: Path, name: str, text: str = "") -> Path:
    logs = temp_dir / name / "logs"
    logs.mkdir(parents=True)
    (logs / "gcs_server.out").write_text(text)
    latest = temp_dir / "session_latest"
    latest.unlink(missing_ok=True)
    latest.symlink_to(temp_dir / name)
    return logs / "gcs_server.out"


def test_gcs_log_path_follows_session_latest(tmp_path: Path) -> None:
    assert gcs_log_path(tmp_path) is None
    log_file = _session(tmp_path, "session_1")
    assert gcs_log_path(tmp_path) == log_file.resolve()


def test_follower_skips_an_earlier_session_and_reads_a_new_one_from_the_start(
    tmp_path: Path,
) -> None:
    old = _session(tmp_path, "session_old", MISSING + "\n")
    follower = LogFollower(lambda: gcs_log_path(tmp_path))
    follower.skip_existing()
    assert follower.read_lines() == []
    with old.open("a") as handle:
        handle.write(UNRELATED + "\n")
    assert follower.read_lines() == [UNRELATED]
    _session(tmp_path, "session_new", SYNCER_INVALID + "\n" + MISSING + "\n")
    assert follower.read_lines() == [SYNCER_INVALID, MISSING]
    assert follower.read_lines() == []


def test_follower_keeps_a_partial_line_until_it_ends(tmp_path: Path) -> None:
    log_file = _session(tmp_path, "session_1")
    follower = LogFollower(lambda: gcs_log_path(tmp_path))
    with log_file.open("a") as handle:
        handle.write(MISSING[:20])
    assert follower.read_lines() == []
    with log_file.open("a") as handle:
        handle.write(MISSING[20:] + "\n")
    assert follower.read_lines() == [MISSING]


def test_follower_starts_over_when_the_file_is_truncated(tmp_path: Path) -> None:
    log_file = _session(tmp_path, "session_1", UNRELATED + "\n" + UNRELATED + "\n")
    follower = LogFollower(lambda: gcs_log_path(tmp_path))
    assert len(follower.read_lines()) == 2
    log_file.write_text(MISSING + "\n")  # shorter than what was read: rotated in place
    assert follower.read_lines() == [MISSING]


def test_refusal_log_logs_a_burst_once_then_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    refusals = RefusalLog(window_s=30.0, clock=lambda: now[0])
    refusal = parse_ray_refusal(MISSING)
    assert refusal is not None
    with caplog.at_level(logging.WARNING, logger="coordinator.access.refusals.ray_gcs"):
        for _ in range(20):  # `ray start` retrying once a second
            refusals.add(refusal)
            now[0] += 1.0
        assert [r.getMessage() for r in caplog.records] == [
            f"{refusal.describe()} (GCS log: {MISSING})"
        ]
        now[0] += 30.0
        refusals.flush()
    summary = caplog.records[-1].getMessage()
    assert len(caplog.records) == 2
    assert summary.startswith(f"Ray: refused 19 more request(s) from {UNKNOWN_PEER}")


def test_refusal_log_flushes_everything_on_request(caplog: pytest.LogCaptureFixture) -> None:
    refusals = RefusalLog(window_s=30.0, clock=lambda: 0.0)
    invalid = parse_ray_refusal(SYNCER_INVALID)
    assert invalid is not None
    with caplog.at_level(logging.WARNING, logger="coordinator.access.refusals.ray_gcs"):
        refusals.add(invalid)
        refusals.add(invalid)
        refusals.flush()
        assert len(caplog.records) == 1  # the window is still open
        refusals.flush(everything=True)
    assert "refused 1 more request(s) from node c15f3033ee" in caplog.records[-1].getMessage()


def _value(metrics: CoordinatorMetrics, reason: str) -> float | None:
    labels = {"channel": "ray", "reason": reason}
    return metrics.registry.get_sample_value("consortium_auth_refusals_total", labels)


def test_ray_refusals_have_zero_series_then_count_by_reason() -> None:
    metrics = CoordinatorMetrics(CollectorRegistry())
    assert _value(metrics, MISSING_TOKEN) == 0 and _value(metrics, INVALID_TOKEN) == 0
    for line in (MISSING, MISSING, SYNCER_INVALID):
        refusal = parse_ray_refusal(line)
        assert refusal is not None
        metrics.auth_refused("ray", refusal.reason)
    assert _value(metrics, MISSING_TOKEN) == 2 and _value(metrics, INVALID_TOKEN) == 1


def test_watch_reports_each_refusal_of_the_new_session(tmp_path: Path) -> None:
    _session(tmp_path, "session_old", MISSING + "\n")  # an earlier head's: not reported
    seen: list[RayRefusal] = []
    three = threading.Event()

    def on_refusal(refusal: RayRefusal) -> None:
        seen.append(refusal)
        if len(seen) == 3:
            three.set()

    watch = RayRefusalWatch(tmp_path, on_refusal, poll_interval_s=0.01)
    watch.start()
    try:
        new = _session(tmp_path, "session_new", UNRELATED + "\n")
        with new.open("a") as handle:
            handle.write(MISSING + "\n" + SYNCER_INVALID + "\n" + MISSING + "\n")
        assert three.wait(timeout=10)
    finally:
        watch.stop()
    assert [r.reason for r in seen] == [MISSING_TOKEN, INVALID_TOKEN, MISSING_TOKEN]


def test_watch_survives_a_failing_hook(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    called = threading.Event()

    def broken(_: RayRefusal) -> None:
        called.set()
        raise RuntimeError("metrics are down")

    watch = RayRefusalWatch(tmp_path, broken, poll_interval_s=0.01)
    watch.start()
    try:
        _session(tmp_path, "session_1", MISSING + "\n")
        assert called.wait(timeout=10)
    finally:
        watch.stop()
    assert any("trying again" in r.getMessage() for r in caplog.records)
