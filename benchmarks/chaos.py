"""Benchmark: a long seeded chaos run, and the same job without faults beside it.

    python benchmarks/chaos.py [--faults 24] [--rounds 16] [--seed 15]

Runs tests/chaos/driver.py's `ChaosRun` (a federated job on a local consortium of two
sites while the coordinator, its SuperLink, the job's ServerApp, a site's SuperNode and
a site's `client join` are killed with SIGKILL at seeded moments and restarted as an
operator would), then the same job with no faults, and prints: faults injected by
target, recoveries, rounds lost (target 0), rounds applied twice (target 0), whether the
log verifies and the aggregates replay, processes left behind (target 0), and whether
the final model equals the fault-free one, with both held-out accuracies. It need not:
a round that a site missed while it restarted aggregates fewer updates, and Flower samples
the nodes available at each round, so even two fault-free runs can differ.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# The chaos driver is the test suite's (tests/chaos/driver.py): one harness for both.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.chaos.driver import ChaosReport, ChaosRun
from tests.conftest import Processes


def one_run(root: Path, seed: int, faults: int, rounds: int) -> tuple[ChaosReport, float]:
    processes = Processes(root / "logs")
    started = time.perf_counter()
    chaos = ChaosRun(root, processes, seed=seed, faults=faults, rounds=rounds, say=print)
    report = ChaosReport()
    try:
        report = chaos.run()
    finally:
        chaos.stop_and_count_leftovers(report)
    return report, time.perf_counter() - started


def accuracy(report: ChaosReport) -> str:
    return f"{report.final_accuracy:.4f}" if report.final_accuracy is not None else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faults", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chaos-") as work:
        chaotic, chaotic_s = one_run(Path(work) / "chaos", args.seed, args.faults, args.rounds)
        calm, calm_s = one_run(Path(work) / "calm", args.seed, 0, args.rounds)
    by_target = Counter(f.target for f in chaotic.faults)
    job = chaotic.job
    print()
    print(f"faults injected        {len(chaotic.faults)}  ({dict(sorted(by_target.items()))})")
    print(f"recoveries             {chaotic.recoveries} (coordinators and sites restarted)")
    print(f"job                    {job.state.value if job else '?'}: {job.message if job else ''}")
    print(f"rounds lost            {chaotic.rounds_lost}   (target 0)")
    print(f"rounds applied twice   {chaotic.rounds_twice}   (target 0)")
    print(f"log verifies           {chaotic.verify_ok}")
    replayed = chaotic.replay is not None and chaotic.replay.returncode == 0
    print(f"aggregates replay      {replayed}")
    print(f"processes left         {len(chaotic.left_running)}   (target 0)")
    same = chaotic.model_sha256 == calm.model_sha256 and bool(calm.model_sha256)
    print(
        f"final model            {'equal to' if same else 'differs from'} the fault-free run "
        f"({chaotic.model_sha256[:16]} vs {calm.model_sha256[:16]}); held-out accuracy "
        f"{accuracy(chaotic)} vs {accuracy(calm)}"
    )
    print(f"wall time              {chaotic_s:.0f} s with faults, {calm_s:.0f} s without")


if __name__ == "__main__":
    main()
