"""Benchmark: a long seeded chaos run, and the same jobs without faults beside it.

    python benchmarks/chaos.py [--faults 24] [--rounds 16] [--pretrain-faults 8]
                               [--outer-steps 12] [--seed 15]

Runs tests/chaos/driver.py's `ChaosRun`: on a local consortium of two sites, a
federated job while the coordinator, its SuperLink, the job's ServerApp, a site's
SuperNode and a site's `client join` are killed with SIGKILL at seeded moments, then a
DiLoCo pretraining job while the coordinator, a site's `client join`, its Ray worker
node and its trainer are; what died is restarted as an operator would. Then the same
jobs with no faults. Prints, per job: faults injected by target, rounds lost (target 0),
rounds applied twice (target 0), whether it replays, and whether its final model equals
the fault-free one, with both final metrics; and overall: recoveries, whether the log
verifies, processes left behind (target 0). The models need not be equal: a round that a
site missed while it restarted aggregates fewer updates (an outer step, fewer workers),
and Flower samples the nodes available at each round, so even two fault-free federated
runs can differ.
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

from tests.chaos.driver import ChaosReport, ChaosRun, JobReport
from tests.conftest import Processes


def one_run(root: Path, args: argparse.Namespace, chaos: bool) -> tuple[ChaosReport, float]:
    processes = Processes(root / "logs")
    started = time.perf_counter()
    run = ChaosRun(
        root,
        processes,
        seed=args.seed,
        faults=args.faults if chaos else 0,
        rounds=args.rounds,
        pretrain_steps=args.outer_steps,
        pretrain_faults=args.pretrain_faults if chaos else 0,
        say=print,
    )
    report = ChaosReport()
    try:
        report = run.run()
    finally:
        run.stop_and_count_leftovers(report)
    return report, time.perf_counter() - started


def metric(job: JobReport | None) -> str:
    if job is None or job.final_metric is None:
        return "?"
    return f"{job.metric_name} {job.final_metric:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faults", type=int, default=24, help="during the federated job")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--pretrain-faults", type=int, default=8)
    parser.add_argument("--outer-steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chaos-") as work:
        chaotic, chaotic_s = one_run(Path(work) / "chaos", args, chaos=True)
        calm, calm_s = one_run(Path(work) / "calm", args, chaos=False)
    print()
    for kind, job in chaotic.jobs.items():
        faults = [f for f in chaotic.faults if f.job == kind]
        by_target = dict(sorted(Counter(f.target for f in faults).items()))
        record = job.job
        state = f"{record.state.value}: {record.message}" if record else "?"
        replayed = job.replay is not None and job.replay.returncode == 0
        twin = calm.jobs.get(kind)
        same = twin is not None and bool(twin.model_sha256)
        same = same and job.model_sha256 == (twin.model_sha256 if twin else "")
        print(f"{kind} job")
        print(f"  faults injected      {len(faults)}  ({by_target})")
        print(f"  job                  {state}")
        print(f"  rounds lost          {job.rounds_lost}   (target 0)")
        print(f"  rounds applied twice {job.rounds_twice}   (target 0)")
        print(f"  replays              {replayed}")
        print(
            f"  final model          {'equal to' if same else 'differs from'} the fault-free "
            f"run's; {metric(job)} vs {metric(twin)}"
        )
    print(f"recoveries             {chaotic.recoveries} (coordinators and sites restarted)")
    print(f"log verifies           {chaotic.verify_ok}")
    print(f"processes left         {len(chaotic.left_running)}   (target 0)")
    print(f"wall time              {chaotic_s:.0f} s with faults, {calm_s:.0f} s without")


if __name__ == "__main__":
    main()
