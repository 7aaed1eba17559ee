"""Coordinator metrics read from the state store and the provenance log at scrape time.

Rounds are run by the ServerApp, a process Flower starts, which writes them to
the state store and signs them into the provenance log. Reading both is the one
view every process shares, and counters rebuilt from them survive a restart.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from consortium.errors import JobSpecError
from consortium.metrics_http import JsonLinesTail
from consortium.provenance.records import RecordType
from coordinator.data_dir import DataDir
from coordinator.federated.reasons import UPDATE_REJECT_REASONS, refused_reason
from coordinator.jobs.spec import parse_job_spec
from coordinator.pretraining.accounting import ComputeKey, split_compute
from coordinator.provenance.recorder import COMMIT_REFUSAL_REASONS
from coordinator.state import FINAL_JOB_STATES, JobRecord, JobState, NodeState, StateStore
from coordinator.state.records import RoundRecord

COMPUTE_DEVICES = ("cpu", "gpu")
ROUND_DURATION_BUCKETS_S = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# Per-job series cover running jobs and this many of the newest, so their
# number stays bounded however long the coordinator lives.
RECENT_JOBS = 10
# A finished job's rounds are summarised once, after this settling time (a
# round recorded just as the scheduler fails the job still lands first).
SETTLED_AFTER_MS = 60_000


@dataclass(frozen=True)
class RoundSummary:
    """What one job's rounds add to the federation-wide counters."""

    completed: int = 0
    accepted: int = 0
    dropouts: int = 0
    durations_s: tuple[float, ...] = ()
    last: RoundRecord | None = None


def summarise_rounds(rounds: list[RoundRecord], min_clients: int) -> RoundSummary:
    """Round 0 is the initial evaluation: it has metrics but no training."""
    ordered = sorted(rounds, key=lambda r: r.round)
    finished = {r.round: r.finished_at_ms for r in ordered}
    trained = [r for r in ordered if r.round > 0]
    # A round lasts from the end of the previous one; after a coordinator
    # restart that span includes the downtime.
    durations = tuple(
        max(0.0, (r.finished_at_ms - finished[r.round - 1]) / 1000)
        for r in trained
        if r.round - 1 in finished
    )
    return RoundSummary(
        completed=len(trained),
        accepted=sum(r.participants for r in trained),
        dropouts=sum(max(0, min_clients - r.participants) for r in trained),
        durations_s=durations,
        last=ordered[-1] if ordered else None,
    )


def _min_clients(job: JobRecord) -> int:
    try:
        return parse_job_spec(job.spec_toml).min_clients
    except JobSpecError:
        return 0


class ProvenanceStats:
    """Entries, bytes, refused updates, pretraining contributions that failed a spot
    check and the newest signed tree head of the provenance log (format:
    consortium/provenance/log.py), read incrementally."""

    def __init__(self, path: Path) -> None:
        self._tail = JsonLinesTail(path)
        self.entries = 0
        self.tree_head_ms: int | None = None
        self.tree_size = 0  # records the newest tree head covers
        self.rejected: dict[str, int] = {}
        self.verification_failed: dict[str, int] = {}  # institution -> contributions
        # (institution, device) -> device-seconds of pretraining inner loops, both
        # placements: given (its workers' results in the averages) and used (each step's
        # total split evenly over the institutions taking part; pretraining/accounting.py)
        self.compute_contributed: dict[ComputeKey, float] = {}
        self.compute_consumed: dict[ComputeKey, float] = {}

    def refresh(self) -> None:
        read = self._tail.read_new()
        if read.restarted:
            self.entries, self.tree_head_ms, self.tree_size, self.rejected = 0, None, 0, {}
            self.verification_failed, self.compute_contributed, self.compute_consumed = {}, {}, {}
        for line in read.lines:
            if line.get("kind") == "record":
                self.entries += 1
                # Raw bodies, not `parse_record`: this reads the live, unverified tail and
                # must count what it can rather than raise on a partial record.
                if line.get("type") == RecordType.ROUND:
                    self._count_refusals(line.get("body"))
                elif line.get("type") == RecordType.OUTER_STEP:
                    self._count_failed_checks(line.get("body"))
                    self._count_refused_contributions(line.get("body"))
                    self._count_compute(line.get("body"))
            elif line.get("kind") == "tree_head":
                self._tree_head(line)

    def _tree_head(self, line: dict[str, Any]) -> None:
        timestamp_ms, tree_size = line.get("timestamp_ms"), line.get("tree_size")
        if isinstance(timestamp_ms, int) and isinstance(tree_size, int):
            self.tree_head_ms = max(self.tree_head_ms or 0, timestamp_ms)
            self.tree_size = max(self.tree_size, tree_size)

    def _count_refusals(self, body: Any) -> None:
        updates = body.get("updates") if isinstance(body, dict) else None
        for update in updates if isinstance(updates, list) else []:
            if isinstance(update, dict) and update.get("accepted") is False:
                reason = str(update.get("reason") or "unspecified")
                self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def _count_failed_checks(self, body: Any) -> None:
        """Both placements' steps (the Ray pool's driver and a federated run's ServerApp
        write the same record): worker ids begin "<institution>/"."""
        failed = body.get("verification_failed") if isinstance(body, dict) else None
        for worker in failed if isinstance(failed, dict) else {}:
            institution = str(worker).split("/", 1)[0]
            self.verification_failed[institution] = self.verification_failed.get(institution, 0) + 1

    def _count_refused_contributions(self, body: Any) -> None:
        """Federated pretraining replies admission refused (signature, key, count, ...)."""
        lost = body.get("workers_lost") if isinstance(body, dict) else None
        for text in lost.values() if isinstance(lost, dict) else []:
            reason = refused_reason(str(text))
            if reason is not None:
                self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def _count_compute(self, body: Any) -> None:
        workers = body.get("workers") if isinstance(body, dict) else None
        results = [
            (str(w.get("institution", "")), _device(w.get("device")), float(w["compute_s"]))
            for w in (workers if isinstance(workers, list) else [])
            if isinstance(w, dict) and isinstance(w.get("compute_s"), int | float)
        ]
        contributed, consumed = split_compute(results)
        for totals, step in (
            (self.compute_contributed, contributed),
            (self.compute_consumed, consumed),
        ):
            for key, seconds in step.items():
                totals[key] = totals.get(key, 0.0) + seconds

    def size_bytes(self) -> int:
        return self._tail.size_bytes()


class StateCollector(Collector):
    """Jobs, nodes, rounds and the provenance log, as the state store has them now.

    Every read runs on one worker thread: the SQLite store keeps a connection per
    thread, and the HTTP server starts a thread per scrape, which would leave a
    connection behind for every scrape.
    """

    def __init__(
        self,
        store: StateStore,
        node_timeout_s: float,
        data_dir: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._node_timeout_ms = int(node_timeout_s * 1000)
        self._clock = clock
        self._settled: dict[str, RoundSummary] = {}  # finished jobs never change again
        self._provenance = ProvenanceStats(DataDir(data_dir).provenance_log)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-state")

    def collect(self) -> Iterator[Metric]:
        return iter(self._reader.submit(self._read).result())

    def close(self) -> None:
        self._reader.shutdown(wait=True)

    def _read(self) -> list[Metric]:
        now_ms = int(self._clock() * 1000)
        jobs = self._store.list_jobs()
        summaries = {job.job_id: self._summary(job, now_ms) for job in jobs}
        recent = {j.job_id for j in jobs[-RECENT_JOBS:]}
        shown = [j for j in jobs if j.job_id in recent or j.state is JobState.RUNNING]
        self._provenance.refresh()
        return [
            *self._job_states(jobs),
            *self._nodes(now_ms),
            *self._federation(list(summaries.values())),
            *self._per_job(shown, summaries, now_ms),
            *self._provenance_metrics(now_ms),
        ]

    def _summary(self, job: JobRecord, now_ms: int) -> RoundSummary:
        if job.job_id in self._settled:
            return self._settled[job.job_id]
        summary = summarise_rounds(self._store.list_rounds(job.job_id), _min_clients(job))
        if job.state in FINAL_JOB_STATES and now_ms - job.finished_at_ms > SETTLED_AFTER_MS:
            self._settled[job.job_id] = summary
        return summary

    def _job_states(self, jobs: list[JobRecord]) -> Iterator[Metric]:
        family = GaugeMetricFamily("consortium_jobs", "Jobs by state.", labels=["state"])
        for state in JobState:
            family.add_metric([state.value], sum(j.state is state for j in jobs))
        yield family

    def _nodes(self, now_ms: int) -> Iterator[Metric]:
        counts: dict[tuple[str, str], int] = {}
        newest: dict[str, int] = {}
        for node in self._store.list_nodes():
            state = node.state
            # The registry marks silent nodes stale lazily; report what is true now.
            if state is NodeState.ONLINE and now_ms - node.last_heartbeat_ms > (
                self._node_timeout_ms
            ):
                state = NodeState.STALE
            for each in NodeState:
                counts.setdefault((node.institution, each.value), 0)
            counts[(node.institution, state.value)] += 1
            if node.state is not NodeState.GONE:
                newest[node.institution] = max(
                    newest.get(node.institution, 0), node.last_heartbeat_ms
                )
        nodes = GaugeMetricFamily(
            "consortium_nodes",
            "Registered nodes by institution and state.",
            labels=["institution", "state"],
        )
        for labels, count in sorted(counts.items()):
            nodes.add_metric(list(labels), count)
        yield nodes
        age = GaugeMetricFamily(
            "consortium_institution_heartbeat_age_seconds",
            "Seconds since the newest heartbeat of an institution's nodes that have not left.",
            labels=["institution"],
        )
        for institution, last_ms in sorted(newest.items()):
            age.add_metric([institution], max(0.0, (now_ms - last_ms) / 1000))
        yield age

    def _federation(self, summaries: list[RoundSummary]) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "consortium_rounds_completed_total",
            "Federated training rounds completed, all jobs.",
            value=sum(s.completed for s in summaries),
        )
        yield CounterMetricFamily(
            "consortium_updates_accepted_total",
            "Client updates aggregated into a round, all jobs.",
            value=sum(s.accepted for s in summaries),
        )
        yield CounterMetricFamily(
            "consortium_round_dropouts_total",
            "Replies a round was short of its job's min_clients (a lower bound on dropouts).",
            value=sum(s.dropouts for s in summaries),
        )
        rejected = CounterMetricFamily(
            "consortium_updates_rejected_total",
            "Client updates refused by admission or validation checks, by reason "
            "(from the provenance log).",
            labels=["reason"],
        )
        totals = dict.fromkeys(UPDATE_REJECT_REASONS, 0) | self._provenance.rejected
        for reason, count in sorted(totals.items()):
            rejected.add_metric([reason], count)
        yield rejected
        refused = CounterMetricFamily(
            "consortium_round_commits_refused_total",
            "Round commits refused by reason: stale_run (a newer Flower run owns the job), "
            "duplicate_round (already committed). Never recorded in state or log.",
            labels=["reason"],
        )
        commits = dict.fromkeys(COMMIT_REFUSAL_REASONS, 0) | self._store.refused_commits()
        for reason, count in sorted(commits.items()):
            refused.add_metric([reason], count)
        yield refused
        yield _histogram(
            "consortium_round_duration_seconds",
            "Time from the end of one round of a job to the end of the next.",
            [d for s in summaries for d in s.durations_s],
            ROUND_DURATION_BUCKETS_S,
        )

    def _per_job(
        self, jobs: list[JobRecord], summaries: dict[str, RoundSummary], now_ms: int
    ) -> Iterator[Metric]:
        labels = ["job_id", "job_name"]

        def gauge(name: str, help_text: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, help_text, labels=labels)

        completed = gauge("consortium_job_rounds_completed", "Rounds a job has completed.")
        planned = gauge("consortium_job_rounds_planned", "Rounds a job's spec asks for.")
        participants = gauge(
            "consortium_job_last_round_participants", "Updates aggregated in a job's last round."
        )
        stall = gauge(
            "consortium_job_round_stall_seconds",
            "Seconds a running job has waited since it started or last completed a round "
            "(0 unless running).",
        )
        evals = {
            "eval_accuracy": gauge(
                "consortium_job_eval_accuracy_ratio",
                "Held-out accuracy of a job's latest global model (0-1).",
            ),
            "eval_loss": gauge(
                "consortium_job_eval_loss", "Held-out loss of a job's latest global model."
            ),
            "train_loss": gauge(
                "consortium_job_train_loss", "Mean local training loss in a job's last round."
            ),
        }
        for job in jobs:
            values = [job.job_id, job.name]
            summary = summaries[job.job_id]
            last = summary.last
            completed.add_metric(values, job.rounds_completed)
            planned.add_metric(values, job.rounds_total)
            participants.add_metric(values, last.participants if last else 0)
            stall.add_metric(values, self._stall_s(job, now_ms))
            for key, family in evals.items():
                if last is not None and key in last.metrics:
                    family.add_metric(values, last.metrics[key])
        yield from (completed, planned, participants, stall, *evals.values())

    def _stall_s(self, job: JobRecord, now_ms: int) -> float:
        if job.state is not JobState.RUNNING:
            return 0.0
        # The newest event is the (re)start or the last completed round; unlike
        # the rounds themselves, it also moves when a job resumes after a restart.
        events = self._store.events_after(job.job_id, 0)
        since_ms = events[-1].time_ms if events else job.started_at_ms
        return max(0.0, (now_ms - since_ms) / 1000)

    def _provenance_metrics(self, now_ms: int) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "consortium_provenance_log_entries",
            "Signed records in the provenance log.",
            value=self._provenance.entries,
        )
        yield GaugeMetricFamily(
            "consortium_provenance_log_size_bytes",
            "Size of the provenance log file.",
            value=self._provenance.size_bytes(),
        )
        yield GaugeMetricFamily(
            "consortium_provenance_unsigned_entries",
            "Records not yet covered by a signed tree head.",
            value=max(0, self._provenance.entries - self._provenance.tree_size),
        )
        institutions = {node.institution for node in self._store.list_nodes()}
        for name, help_text, totals in (
            (
                "consortium_compute_contributed_seconds_total",
                "Device-seconds of pretraining inner loops an institution's workers ran "
                "(device: gpu or cpu), at its sites or on the Ray pool, from the log.",
                self._provenance.compute_contributed,
            ),
            (
                "consortium_compute_consumed_seconds_total",
                "Device-seconds of pretraining used on an institution's behalf: each outer "
                "step's total split evenly over the institutions taking part, from the log.",
                self._provenance.compute_consumed,
            ),
        ):
            family = CounterMetricFamily(name, help_text, labels=["institution", "device"])
            # Every joined institution has a series (zero until it computes or uses any).
            zero = {(i, d): 0.0 for i in institutions for d in COMPUTE_DEVICES}
            for (institution, device), seconds in sorted((zero | totals).items()):
                family.add_metric([institution, device], seconds)
            yield family
        failures = CounterMetricFamily(
            "consortium_pretrain_verification_failures_total",
            "Pretraining contributions the coordinator re-executed and found different "
            "from what the worker sent (the worker was dropped, its institution barred), "
            "from the provenance log.",
            labels=["institution"],
        )
        for institution, count in sorted(self._provenance.verification_failed.items()):
            failures.add_metric([institution], count)
        yield failures
        head_ms = self._provenance.tree_head_ms
        # NaN, not 0, before the first tree head: unknown, and never "fresh".
        age = math.nan if head_ms is None else max(0.0, (now_ms - head_ms) / 1000)
        yield GaugeMetricFamily(
            "consortium_provenance_tree_head_age_seconds",
            "Seconds since the newest signed tree head (NaN before the first).",
            value=age,
        )


def _device(value: object) -> str:
    return str(value) if value in COMPUTE_DEVICES else "cpu"  # a slot is a GPU or a CPU


def _histogram(
    name: str, help_text: str, observations: list[float], buckets: tuple[float, ...]
) -> HistogramMetricFamily:
    cumulative = [
        (str(bound), float(sum(1 for o in observations if o <= bound))) for bound in buckets
    ]
    cumulative.append(("+Inf", float(len(observations))))
    return HistogramMetricFamily(name, help_text, buckets=cumulative, sum_value=sum(observations))
