"""Benchmark: the CPU a program's start-up costs, its modules loaded with Python's garbage
collector running (as Flower's and Ray's own scripts load them) and as the project's
launchers load them: paused, then frozen (`consortium.startup.load`), and for `ray
start` without the command groups it never uses
(`consortium.startup.leave_out_unused_ray_cli_groups`).

    python benchmarks/startup.py [--repeats 7]

Each program's loading runs in a fresh interpreter of this venv, both ways alternately
(so a machine that slows down meanwhile slows both), `--repeats` times; it prints the
median CPU seconds (user + system, the child's own `time.process_time`) of each way,
the difference and the ratio, then the totals. The programs are those the coordinator
and the sites start over and over: every CLI call, every SuperLink, SuperNode and
ServerApp start, every Ray node, a site's ClientApp at its first task.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

# (what starts it, the `module:attribute` its launcher loads, the modules loaded with it,
# the modules the process had loaded before: the CLI, before `serve` or `join` loads)
PROGRAMS: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("coordinator (CLI)", "coordinator.cli.main:app", (), ()),
    ("client (CLI)", "client.cli:app", (), ()),
    (
        "coordinator serve's modules",
        "coordinator.serve:Coordinator",
        (),
        ("coordinator.cli.main",),
    ),
    ("client join's modules", "client.join:SiteNode", (), ("client.cli",)),
    ("flower-superlink", "flwr.superlink.cli:flower_superlink", (), ()),
    (
        "flwr-serverapp and the ServerApp",
        "flwr.superlink.cli:flwr_serverapp",
        ("coordinator.federated.server_app",),
        (),
    ),
    (
        "consortium-flower-supernode",
        "client.federated.fast_poll_supernode:main",
        ("flwr.supernode.start_client_internal", "flwr.supernode.cli"),
        (),
    ),
    ("ray start (consortium-ray start)", "ray.scripts.scripts:main", (), ()),
    (
        "a site's ClientApp (first task)",
        "client.federated.client_app:app",
        (),
        ("client.join",),
    ),
)

# Loads the program in this fresh interpreter and prints the CPU seconds it took.
# `already` are loaded first, either way, outside the measurement (what the program
# had loaded before: the CLI before `serve` or `join` loads their modules).
CHILD = """
import importlib, sys, time
paused = sys.argv[1] == "paused"
target, already, preload = sys.argv[2], sys.argv[3].split(","), sys.argv[4].split(",")
for name in filter(None, already):
    importlib.import_module(name)
started = time.process_time()
if paused:
    from consortium.startup import leave_out_unused_ray_cli_groups, load
    if target == "ray.scripts.scripts:main":  # as `consortium-ray start` loads it
        leave_out_unused_ray_cli_groups()
    load(target, *filter(None, preload))
else:
    for name in filter(None, preload):
        importlib.import_module(name)
    module, _, attribute = target.partition(":")
    getattr(importlib.import_module(module), attribute)
print(time.process_time() - started)
"""


def cpu_seconds(way: str, target: str, already: tuple[str, ...], preload: tuple[str, ...]) -> float:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, way, target, ",".join(already), ",".join(preload)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(
        f"CPU seconds to load each program, median of {args.repeats}, "
        "as Flower's and Ray's scripts load them (collector running) vs as the launchers "
        "do (paused then frozen; ray start without its unused command groups)"
    )
    print(f"{'program':36} {'running':>8} {'paused':>8} {'saved':>7} {'ratio':>6}")
    totals = [0.0, 0.0]
    for name, target, preload, already in PROGRAMS:
        samples: dict[str, list[float]] = {"running": [], "paused": []}
        for _ in range(args.repeats):
            for way, seconds in samples.items():  # alternately: a drifting machine slows both
                seconds.append(cpu_seconds(way, target, already, preload))
        running, paused = (statistics.median(samples[w]) for w in ("running", "paused"))
        totals[0] += running
        totals[1] += paused
        print(
            f"{name:36} {running:8.3f} {paused:8.3f} {running - paused:7.3f} "
            f"{paused / running:6.2f}",
            flush=True,
        )
    saved = totals[0] - totals[1]
    print(
        f"{'all of them once':36} {totals[0]:8.3f} {totals[1]:8.3f} {saved:7.3f} "
        f"{totals[1] / totals[0]:6.2f}"
    )


if __name__ == "__main__":
    main()
