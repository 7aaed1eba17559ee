"""`coordinator demo --wan`: the coordinator and each site in a network namespace of its
own, linked through a shaped bridge (coordinator/wan.py), run the demo's pipeline:
federated pretraining at the sites, then fine-tuning, verified and replayed.

The coordinator binds only its test-bed address, which no process outside the test bed
can reach, so a site that joined at all joined across the test bed; the namespaces are
gone afterwards. Needs root (CI runs as root). On a kernel without sch_netem (CI's) the
links are only rate-limited, and the demo says so.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from consortium.provenance.log import records_of
from coordinator.data_dir import DataDir
from coordinator.wan import COORDINATOR_ADDRESS
from tests.conftest import Processes
from tests.helpers import TEST_PROFILE

TIMEOUT_S = 300.0


def _namespaces() -> str:
    return subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout


def test_the_demo_pretrains_and_fine_tunes_with_every_site_behind_its_own_link(
    tmp_path: Path,
) -> None:
    processes = Processes(tmp_path / "logs")
    work = tmp_path / "demo"
    try:
        child = processes.start(
            "demo",
            "coordinator",
            "demo",
            "--wan",
            "--work-dir",
            str(work),
            "--institutions",
            "2",
            "--rounds",
            "1",
            "--outer-steps",
            "1",
            "--inner-steps",
            "5",
            env=TEST_PROFILE,
        )
        deadline = time.monotonic() + TIMEOUT_S
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        returncode = child.poll()
        output = " ".join(child.log_path.read_text().split())
    finally:
        processes.stop_all()
    assert returncode == 0, output[-3000:]
    assert "every site in its own network namespace" in output
    assert "replay OK: 1 outer step(s) reproduced bit for bit" in output
    data_dir = DataDir(work / "coordinator")
    # The sites were sent to the coordinator's test-bed address, the only one it bound.
    bundle = (work / "institutions" / "aurora-hospital" / "bundle" / "bundle.toml").read_text()
    assert f'"{COORDINATOR_ADDRESS}:' in bundle
    steps = [e["body"] for e in records_of(data_dir.provenance_log) if e["type"] == "outer_step"]
    assert len(steps) == 1
    assert sorted(w["institution"] for w in steps[0]["workers"]) == [
        "aurora-hospital",
        "borealis-university",
    ]
    assert "-aurora-hospital" not in _namespaces()  # the test bed is gone
