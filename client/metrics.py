"""Client metrics: `consortium_client_*` families of one node, labelled by institution.

`client join` serves them. Training itself happens in ClientApp processes that
Flower's SuperNode starts, so the ClientApp reports each local training run by
appending a line to `<state_dir>/training.jsonl` with `record_training`, and
`TrainingCollector` sums the file at scrape time.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from consortium.metrics_http import JsonLinesTail
from consortium.processes import descendant_pids
from consortium.provenance.witness import REFUSAL_REASONS as WITNESS_REFUSAL_REASONS
from consortium.provenance.witness import REFUSALS_FILE as WITNESS_REFUSALS_FILE
from consortium.provenance.witness import witness_dir
from consortium.run_approval import RefusalReason

log = logging.getLogger(__name__)

TRAINING_LOG = "training.jsonl"


def record_training(state_dir: Path, seconds: float, examples: int) -> None:
    """Append one local training run (wall seconds, examples seen) for `client join`.

    One `write` of one short line to a file opened for appending, so runs from
    concurrent ClientApp processes never interleave within a line. The owner's alone
    (0600, never through a link), as every file of the state dir is.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps(
        {"time_ms": int(time.time() * 1000), "seconds": seconds, "examples": examples}
    )
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
    fd = os.open(state_dir / TRAINING_LOG, flags, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


SUPERVISED_CHILDREN = ("supernode", "ray-worker")  # client join's, by supervisor name


class ClientMetrics:
    """The node's registry: heartbeats, the SuperNode, the process tree, training, GPU."""

    def __init__(self, institution: str, state_dir: Path, gpu: int | None = None) -> None:
        self.registry = CollectorRegistry()
        self._institution = institution
        self._last_contact = time.monotonic()
        self._supernode_alive: Callable[[], bool] = lambda: False
        self._heartbeats = Counter(
            "consortium_client_heartbeats_sent_total",
            "Heartbeats sent to the coordinator, by result (ok, error).",
            ["institution", "result"],
            registry=self.registry,
        )
        for result in ("ok", "error"):
            self._heartbeats.labels(institution, result)
        Gauge(
            "consortium_client_heartbeat_age_seconds",
            "Seconds since the coordinator last acknowledged this node "
            "(registration or heartbeat; since start before that).",
            ["institution"],
            registry=self.registry,
        ).labels(institution).set_function(lambda: time.monotonic() - self._last_contact)
        Gauge(
            "consortium_client_supernode_up",
            "1 while this node's Flower SuperNode process runs, else 0.",
            ["institution"],
            registry=self.registry,
        ).labels(institution).set_function(lambda: float(self._supernode_alive()))
        self._refused_runs = Counter(
            "consortium_site_refused_runs_total",
            "Flower tasks this site refused to execute because the coordinator did not "
            "approve their run, by reason (consortium.run_approval.RefusalReason).",
            ["institution", "reason"],
            registry=self.registry,
        )
        for reason in RefusalReason:
            self._refused_runs.labels(institution, reason.value)
        self._child_restarts = Counter(
            "consortium_child_restarts_total",
            "Restarts of a child process that died (supernode, ray-worker), by child.",
            ["institution", "child"],
            registry=self.registry,
        )
        for child in SUPERVISED_CHILDREN:
            self._child_restarts.labels(institution, child)
        self.registry.register(NodeProcessCollector(institution, os.getpid()))
        self.registry.register(TrainingCollector(institution, state_dir / TRAINING_LOG))
        self.registry.register(
            LogRefusalCollector(institution, witness_dir(state_dir) / WITNESS_REFUSALS_FILE)
        )
        if gpu is not None:
            gpu_collector = GpuCollector.create(institution, gpu)
            if gpu_collector is not None:
                self.registry.register(gpu_collector)

    def contacted(self) -> None:
        """The coordinator answered (a registration or a heartbeat)."""
        self._last_contact = time.monotonic()

    def heartbeat_sent(self, ok: bool) -> None:
        self._heartbeats.labels(self._institution, "ok" if ok else "error").inc()
        if ok:
            self.contacted()

    def watch_supernode(self, alive: Callable[[], bool]) -> None:
        self._supernode_alive = alive

    def run_refused(self, reason: RefusalReason) -> None:
        self._refused_runs.labels(self._institution, reason.value).inc()

    def child_restarted(self, child: str) -> None:
        self._child_restarts.labels(self._institution, child).inc()


class NodeProcessCollector(Collector):
    """CPU seconds and resident memory of `client join` and every process under it
    (the SuperNode, Flower's helpers, the ClientApp processes)."""

    def __init__(self, institution: str, root_pid: int) -> None:
        self._institution = institution
        self._root_pid = root_pid
        self._cpu_s = 0.0
        self._lock = threading.Lock()
        self._ticks_per_s = os.sysconf("SC_CLK_TCK")
        self._page_bytes = os.sysconf("SC_PAGE_SIZE")

    def collect(self) -> Iterator[Metric]:
        if not Path("/proc/self/stat").exists():  # Linux only
            return
        cpu_ticks, rss_pages = 0, 0
        for pid in [self._root_pid, *descendant_pids(self._root_pid)]:
            fields = _proc_stat(pid)
            if fields is None:
                continue
            # utime, stime, cutime, cstime (stat fields 14-17); reaped children's
            # time moves into their parent's cutime/cstime, so it stays counted.
            cpu_ticks += sum(int(f) for f in fields[11:15])
            rss_pages += int(fields[21])
        with self._lock:
            # A helper that escaped the tree takes its time with it; a counter
            # must not go down, so it holds its highest value.
            self._cpu_s = max(self._cpu_s, cpu_ticks / self._ticks_per_s)
            cpu_s = self._cpu_s
        labels = ["institution"]
        cpu = CounterMetricFamily(
            "consortium_client_node_cpu_seconds_total",
            "CPU seconds used by this node's processes (join, SuperNode, ClientApps).",
            labels=labels,
        )
        cpu.add_metric([self._institution], cpu_s)
        rss = GaugeMetricFamily(
            "consortium_client_node_resident_memory_bytes",
            "Resident memory of this node's processes.",
            labels=labels,
        )
        rss.add_metric([self._institution], rss_pages * self._page_bytes)
        yield from (cpu, rss)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


class TrainingCollector(Collector):
    """Totals of the local training runs the ClientApp appended with `record_training`."""

    def __init__(self, institution: str, path: Path) -> None:
        self._institution = institution
        self._tail = JsonLinesTail(path)
        self._lock = threading.Lock()
        self._seconds = 0.0
        self._examples = 0
        self._runs = 0

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            read = self._tail.read_new()
            if read.restarted:
                self._seconds, self._examples, self._runs = 0.0, 0, 0
            for line in read.lines:
                seconds, examples = line.get("seconds"), line.get("examples")
                if isinstance(seconds, int | float) and isinstance(examples, int):
                    self._seconds += seconds
                    self._examples += examples
                    self._runs += 1
            totals = (self._seconds, self._examples, self._runs)
        for (name, help_text), value in zip(
            (
                ("consortium_client_training_seconds_total", "Wall seconds of local training."),
                ("consortium_client_training_examples_total", "Examples trained on locally."),
                ("consortium_client_training_runs_total", "Local training runs (one a round)."),
            ),
            totals,
            strict=True,
        ):
            family = CounterMetricFamily(name, help_text, labels=["institution"])
            family.add_metric([self._institution], value)
            yield family


class LogRefusalCollector(Collector):
    """Log heads this site refused to cosign (and so refused to train), by reason:
    the lines `consortium.provenance.witness.record_refusal` appends."""

    def __init__(self, institution: str, path: Path) -> None:
        self._institution = institution
        self._tail = JsonLinesTail(path)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(WITNESS_REFUSAL_REASONS, 0)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            read = self._tail.read_new()
            if read.restarted:
                self._counts = dict.fromkeys(WITNESS_REFUSAL_REASONS, 0)
            for line in read.lines:
                reason = line.get("reason")
                if isinstance(reason, str) and reason in self._counts:
                    self._counts[reason] += 1
            counts = dict(self._counts)
        family = CounterMetricFamily(
            "consortium_site_log_refusals_total",
            "Coordinator log heads this site refused to cosign, and so refused to train "
            "for: truncated, rewritten, no_proof, bad_head, no_head.",
            labels=["institution", "reason"],
        )
        for reason, count in counts.items():
            family.add_metric([self._institution, reason], count)
        yield family


class GpuCollector(Collector):
    """Utilisation and memory of the node's GPU through NVML, when `pynvml` is there.

    `pynvml` (package nvidia-ml-py) is optional: without it, or without a working
    NVML, the node simply has no GPU series.
    """

    def __init__(self, institution: str, gpu: int, nvml: Any, handle: Any) -> None:
        self._labels = [institution, str(gpu)]
        self._nvml = nvml
        self._handle = handle

    @classmethod
    def create(cls, institution: str, gpu: int) -> GpuCollector | None:
        try:
            nvml = importlib.import_module("pynvml")
            nvml.nvmlInit()
            return cls(institution, gpu, nvml, _nvml_handle(nvml, gpu))
        except Exception as error:  # ImportError, or any NVMLError
            log.info("no GPU metrics for GPU %d: %s", gpu, error)
            return None

    def collect(self) -> Iterator[Metric]:
        try:
            utilisation = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100
            memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except Exception as error:  # a GPU that fell off the bus must not break scrapes
            log.warning("could not read GPU metrics: %s", error)
            return
        labels = ["institution", "gpu"]
        for name, help_text, value in (
            ("consortium_client_gpu_utilization_ratio", "GPU busy fraction (NVML).", utilisation),
            ("consortium_client_gpu_memory_used_bytes", "GPU memory in use.", memory.used),
            ("consortium_client_gpu_memory_total_bytes", "GPU memory size.", memory.total),
        ):
            family = GaugeMetricFamily(name, help_text, labels=labels)
            family.add_metric(self._labels, float(value))
            yield family


def _nvml_handle(nvml: Any, gpu: int) -> Any:
    """NVML numbers GPUs in PCI order, CUDA (and so `--gpu`) in its own order and
    after CUDA_VISIBLE_DEVICES; the device's UUID names the same GPU in both."""
    import torch

    uuid = str(torch.cuda.get_device_properties(gpu).uuid)
    return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
