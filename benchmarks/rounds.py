"""Benchmark: seconds per federated round, plain Flower beside Consortium, same job.

    python benchmarks/rounds.py [--rounds 6] [--sites 2] [--local-epochs 1] [--secure]

The same digits job on the same data split (the demo's Dirichlet shares), model
(digits-cnn), rounds, local epochs, batch size and learning rate, each on Flower's
SuperLink/SuperNode deployment runtime on loopback:

- **plain Flower**: `flower-superlink` and one `flower-supernode` per site with Flower's
  defaults (subprocess isolation: a fresh `flwr-clientapp` per message; the SuperNode
  polls every 3 s), running the app in benchmarks/plain_flower_digits (FedAvg, central
  evaluation on the digits test split);
- **Consortium**: `coordinator serve` and one `client join` per site (plain text, or
  mutual TLS and onboarding with `--secure`), a `digits-cnn` job: signed updates,
  admission, witnessed provenance, checkpoints and retained updates included; then
  the same with the sites' `supernode_poll_interval_s = 3` (Flower's SuperNode wait,
  as Consortium ran before it shortened it).

A round's time is measured between the ends of consecutive rounds (each side's central
evaluation), so start-up is left out; rounds 2..N are averaged. Prints seconds per
round for each, the ratios, and each run's final accuracy.

Then, unless `--skip-hf-lora`, the Hugging Face LoRA example's rows: a site's round
with and without the persistent trainer, and the bytes per round (it runs
benchmarks/hf_lora_trainer.py, which also runs on its own).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from consortium.net import reserve_free_port
from consortium.processes import ChildProcess, stop_processes, venv_executable
from consortium.proto.v1 import jobs_pb2
from coordinator.demo import write_partitions
from coordinator.local_consortium import LocalConsortium

PLAIN_APP = Path(__file__).resolve().parent / "plain_flower_digits"
LEARNING_RATE = 0.05
BATCH_SIZE = 32
TIMEOUT_S = 600.0
FINAL = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)


def wait_for_port(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def per_round(ends_s: list[float]) -> float:
    """Mean seconds between the ends of rounds 1..N (round 0 is the initial model)."""
    rounds = ends_s[1:]
    return (rounds[-1] - rounds[0]) / (len(rounds) - 1)


def plain_flower(
    work: Path, data_dirs: list[Path], args: argparse.Namespace
) -> tuple[float, float]:
    port = reserve_free_port()
    logs = work / "logs"
    logs.mkdir(parents=True)
    children = [
        ChildProcess(
            "flower-superlink",
            [
                venv_executable("flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--database",
                str(work / "superlink.db"),
                "--disable-runtime-dependency-installation",
            ],
            logs / "superlink.log",
        )
    ]
    try:
        wait_for_port(port)
        for i, data in enumerate(data_dirs):
            children.append(
                ChildProcess(
                    f"supernode-{i}",
                    [
                        venv_executable("flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--port",
                        str(reserve_free_port()),
                        "--node-config",
                        f'data-file="{data / "digits.npz"}"',
                    ],
                    logs / f"supernode-{i}.log",
                )
            )
        home = work / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        times = work / "times.jsonl"
        overrides = (
            f"num-server-rounds={args.rounds} local-epochs={args.local_epochs} "
            f"learning-rate={LEARNING_RATE} batch-size={BATCH_SIZE} "
            f'times-file="{times}"'
        )
        env = dict(os.environ, FLWR_HOME=str(home))
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # until the SuperNodes are connected enough for `flwr run` to take it
            done = subprocess.run(
                [
                    venv_executable("flwr"),
                    "run",
                    str(PLAIN_APP),
                    "bench",
                    "--run-config",
                    overrides,
                    "--format",
                    "json",
                ],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"flwr run failed: {done.stdout}{done.stderr}")
            time.sleep(1)
        while not times.exists() or len(times.read_text().splitlines()) <= args.rounds:
            if time.monotonic() > deadline:
                raise RuntimeError(f"plain Flower did not finish; see {logs}")
            time.sleep(0.5)
        lines = [json.loads(line) for line in times.read_text().splitlines()]
        return per_round([line["t"] for line in lines]), float(lines[-1]["accuracy"])
    finally:
        stop_processes(children)


def consortium(
    work: Path,
    names: list[str],
    data_dirs: list[Path],
    args: argparse.Namespace,
    poll_s: float | None = None,
) -> tuple[float, float]:
    spec = (
        f'name = "rounds-benchmark"\nworkload = "digits-cnn"\ndataset = "digits"\n'
        f"rounds = {args.rounds}\nmin_clients = {len(names)}\n"
        f"local_epochs = {args.local_epochs}\nlearning_rate = {LEARNING_RATE}\n"
        f"batch_size = {BATCH_SIZE}\n"
    )
    env = {"CONSORTIUM_CLIENT_SUPERNODE_POLL_INTERVAL_S": str(poll_s)} if poll_s else {}
    with LocalConsortium(work, secure=args.secure, ray=False, env=env) as local:
        if args.secure:
            local.init()
        local.serve()
        for name in names:
            if args.secure:
                local.onboard(name)
        if args.secure:
            local.wait_for_supernode_keys()
        for name, data in zip(names, data_dirs, strict=True):
            local.join(name, data)
        local.wait_for_online(len(names))
        with local.connect() as remote:
            job = remote.submit(spec)
            deadline = time.monotonic() + TIMEOUT_S
            while remote.get(job.job_id).job.state not in FINAL:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Consortium job did not finish; see {work}")
                time.sleep(0.5)
            reply = remote.get(job.job_id)
        ends = [r.finished_at_ms / 1000 for r in sorted(reply.rounds, key=lambda r: r.round)]
        if len(ends) != args.rounds + 1:
            raise RuntimeError(f"the job ended {reply.job.message!r} after {len(ends)} rounds")
        return per_round(ends), reply.rounds[-1].metrics["eval_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--secure", action="store_true", help="Consortium with mutual TLS")
    parser.add_argument("--skip-hf-lora", action="store_true", help="digits rows only")
    args = parser.parse_args()
    names = [f"site-{i}" for i in range(args.sites)]
    with tempfile.TemporaryDirectory(prefix="rounds-bench-") as tmp:
        root = Path(tmp)
        data_dirs = write_partitions(root / "data", names)
        print(f"{args.sites} sites, {args.rounds} rounds of {args.local_epochs} local epoch(s)")
        flower_s, flower_acc = plain_flower(root / "flower", data_dirs, args)
        print(f"plain Flower: {flower_s:.2f} s per round, final accuracy {flower_acc:.3f}")
        ours_s, ours_acc = consortium(root / "consortium", names, data_dirs, args)
        mode = "mutual TLS" if args.secure else "plain text"
        print(f"Consortium ({mode}): {ours_s:.2f} s per round, final accuracy {ours_acc:.3f}")
        slow_s, slow_acc = consortium(root / "consortium-3s", names, data_dirs, args, 3.0)
        print(
            f"Consortium ({mode}), its SuperNodes polling every 3 s as Flower's do: "
            f"{slow_s:.2f} s per round, final accuracy {slow_acc:.3f}"
        )
        print(f"ratio Consortium / plain Flower: {ours_s / flower_s:.2f}")
        print(f"ratio Consortium / Consortium polling every 3 s: {ours_s / slow_s:.2f}")
    if not args.skip_hf_lora:
        print("\nthe Hugging Face LoRA example, one site:", flush=True)
        trainer_benchmark = Path(__file__).resolve().parent / "hf_lora_trainer.py"
        subprocess.run([sys.executable, str(trainer_benchmark)], check=True)


if __name__ == "__main__":
    main()
