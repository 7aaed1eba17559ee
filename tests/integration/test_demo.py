"""`coordinator demo` as the README runs it (smaller): the whole consortium on
loopback, pretraining on the contributed Ray workers, then federated fine-tuning,
verify and replay, and every process it started gone at the end."""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.conftest import Processes
from tests.helpers import TEST_PROFILE, wait_for

DEMO_TIMEOUT_S = 600.0


def test_demo_pretrains_fine_tunes_verifies_replays_and_cleans_up(tmp_path: Path) -> None:
    processes = Processes(tmp_path / "logs")
    try:
        demo = processes.start(
            "demo",
            "coordinator",
            "demo",
            "--work-dir",
            str(tmp_path / "demo"),
            "--institutions",
            "2",
            "--rounds",
            "1",
            env=TEST_PROFILE,  # inherited by every process the demo starts
        )
        deadline = time.monotonic() + DEMO_TIMEOUT_S
        while demo.poll() is None and time.monotonic() < deadline:
            processes.remember_descendants()
            time.sleep(1.0)
        output = demo.log_path.read_text()
        assert demo.poll() == 0, output[-3000:]
    finally:
        processes.stop_all()
    text = " ".join(output.split())  # rich wraps long lines
    assert "pretraining job" in text and "on 2 contributed workers" in text
    before, after = (
        float(x)
        for x in re.findall(r"held-out perplexity: ([\d.]+) \(before\) -> ([\d.]+)", text)[0]
    )
    assert after < before
    assert "replay OK: 4 outer step(s) reproduced bit for bit" in text
    assert "all 1 rounds' aggregates reproduced bit for bit" in text
    # Killed processes can take a moment to leave the process table.
    wait_for("every process the demo started to end", lambda: processes.alive() == [], 15.0)
