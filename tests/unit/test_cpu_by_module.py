"""`make cpu-by-module` (tests/cpu_by_module.py) charges a module with the CPU of the
processes it starts, also those that leave its process tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.cpu_by_module import OUTPUT_ENV

ROOT = Path(__file__).resolve().parents[2]
# A child that spins for about half a CPU-second after its parent has exited, so it is
# reparented away from the test (as Ray's and Flower's daemons are) and no `wait`
# counts it.
BURNER = """
import subprocess, sys, time
from pathlib import Path

SPUN = Path(__file__).with_name("spun")
SPIN = (
    "import time\\nend = time.process_time() + 0.5\\n"
    "while time.process_time() < end: pass\\n"
    f"open({str(SPUN)!r}, 'w').close()"
)

def test_starts_a_process_that_outlives_its_parent():
    orphan = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {SPIN!r}])"
    subprocess.run([sys.executable, "-c", orphan], check=True)
    while not SPUN.exists():  # its CPU lands within the module
        time.sleep(0.05)
"""
IDLE = "def test_does_nothing():\n    pass\n"


def test_a_module_is_charged_with_the_cpu_of_the_processes_it_started(tmp_path: Path) -> None:
    (tmp_path / "test_burner.py").write_text(BURNER)
    (tmp_path / "test_idle.py").write_text(IDLE)
    output = tmp_path / "cpu.jsonl"
    env = {**os.environ, OUTPUT_ENV: str(output), "PYTHONPATH": str(ROOT)}
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [*pytest, "-p", "tests.cpu_by_module", "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    if os.geteuid() != 0:
        assert "not measured" in done.stdout and output.read_text() == ""
        return
    rows = {row["module"]: row for row in map(json.loads, output.read_text().splitlines())}
    assert set(rows) == {"test_burner.py", "test_idle.py"}
    assert rows["test_burner.py"]["cpu_s"] >= 0.5
    assert rows["test_idle.py"]["cpu_s"] < 0.25
    assert "CPU by module (2 modules" in done.stdout
