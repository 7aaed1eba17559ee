"""Shared fixtures: real processes on loopback, always stopped, also on failure."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import pytest

from consortium.processes import ChildProcess, descendant_pids, venv_executable
from consortium.proto.v1 import nodes_pb2

START_TIMEOUT_S = 120.0


class Processes:
    """Starts CLI processes; remembers them and their descendants to stop later."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[ChildProcess] = []
        self.seen_pids: set[int] = set()

    def start(self, name: str, *argv: str) -> ChildProcess:
        executable = venv_executable(argv[0])
        child = ChildProcess(name, [executable, *argv[1:]], self.log_dir / f"{name}.log")
        self.children.append(child)
        self.seen_pids.add(child.pid)
        return child

    def remember_descendants(self) -> None:
        for child in self.children:
            self.seen_pids.update(descendant_pids(child.pid))

    def stop_all(self) -> None:
        self.remember_descendants()
        for child in reversed(self.children):
            child.stop()

    def alive(self) -> list[int]:
        return [pid for pid in self.seen_pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def wait_for(what: str, ready: Callable[[], bool], timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path / "logs")
    try:
        yield procs
    finally:
        procs.stop_all()


def start_coordinator(
    processes: Processes,
    data_dir: Path,
    name: str = "coordinator",
    secure: bool = False,
    flags: Sequence[str] = (),
) -> str:
    """`coordinator serve` on loopback (mutual TLS when `secure`, which needs
    `coordinator init` first; else --insecure), with extra `flags`; returns its API
    address once ready."""
    address_file = data_dir / "coordinator.address"
    flags = [*flags] if secure else ["--insecure", *flags]
    child = processes.start(name, "coordinator", "serve", *flags, "--data-dir", str(data_dir))

    def ready() -> bool:
        if child.poll() is not None:
            raise AssertionError(f"coordinator exited:\n{child.log_tail(40)}")
        return address_file.exists()

    wait_for("the coordinator", ready)
    return address_file.read_text().strip()


def join_site(
    processes: Processes,
    name: str,
    data: Path,
    state_dir: Path,
    *,
    bundle: Path | None = None,
    coordinator: str | None = None,
    institution: str | None = None,
) -> ChildProcess:
    """`client join` with an onboarding bundle (mutual TLS), or, given `coordinator`
    and `institution` instead, with --insecure."""
    if bundle is not None:
        credentials = ["--bundle", str(bundle)]
    else:
        assert coordinator is not None and institution is not None
        credentials = ["--insecure", "--coordinator", coordinator, "--institution", institution]
    return processes.start(
        name, "client", "join", *credentials, "--data", str(data), "--state-dir", str(state_dir)
    )


def online_nodes(nodes: Iterable[nodes_pb2.Node]) -> int:
    return sum(node.state == nodes_pb2.NODE_STATE_ONLINE for node in nodes)


# The smallest pretraining job worth running: one 32-wide layer on 32 KiB of the corpus.
TINY_PRETRAIN = """\
kind = "pretrain"
n_layer = 1
n_head = 2
n_embd = 32
block_size = 32
seq_len = 32
batch_size = 4
num_shards = 2
corpus_bytes = 32768
validation_bytes = 4096
eval_batches = 2
"""
