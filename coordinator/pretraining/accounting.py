"""Who contributed how much compute to a pretraining job, per institution.

Computed from the `OuterStepRecord`s alone (so also from a checkpoint or a provenance
log): the wall-clock seconds of the inner loops that ran on each institution's nodes,
as CPU-seconds or GPU-seconds by the slot's device. Only work whose result entered the
average is counted; a worker lost mid-step leaves no record of what it computed.

*Consumed* compute: a pretraining job serves every institution that takes part in it,
so each outer step's device-seconds are split evenly over the institutions with a
result in that step. Contributed minus consumed is what an institution gave the
consortium beyond its fair share.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from coordinator.pretraining.records import OuterStepRecord


@dataclass
class InstitutionContribution:
    institution: str
    cpu_s: float = 0.0  # CPU-slot seconds (one core per slot)
    gpu_s: float = 0.0  # GPU-seconds (one GPU per slot)
    inner_steps: int = 0
    tokens: int = 0
    bytes_sent: int = 0  # pseudo-gradients uploaded
    bytes_received: int = 0  # global weights downloaded
    outer_steps: int = 0  # outer steps with at least one accepted result from here
    workers: set[str] = field(default_factory=set)
    consumed_cpu_s: float = 0.0  # this institution's even share of each step's total
    consumed_gpu_s: float = 0.0


@dataclass(frozen=True)
class JobAccounting:
    job: str
    institutions: dict[str, InstitutionContribution]

    @property
    def cpu_s(self) -> float:
        return sum(c.cpu_s for c in self.institutions.values())

    @property
    def gpu_s(self) -> float:
        return sum(c.gpu_s for c in self.institutions.values())

    def shares(self) -> dict[str, float]:
        """Each institution's fraction of all device-seconds (CPU and GPU added)."""
        total = self.cpu_s + self.gpu_s
        return {
            name: (c.cpu_s + c.gpu_s) / total if total else 0.0
            for name, c in sorted(self.institutions.items())
        }


def step_compute(
    record: OuterStepRecord,
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """One outer step's (contributed, consumed) device-seconds by (institution, device)."""
    return split_compute((r.institution, r.device, r.compute_s) for r in record.results)


ComputeKey = tuple[str, str]  # (institution, device)


def split_compute(
    results: Iterable[tuple[str, str, float]],
) -> tuple[dict[ComputeKey, float], dict[ComputeKey, float]]:
    """(contributed, consumed) device-seconds by (institution, device), from one step's
    accepted results as (institution, device, compute seconds): also read from an
    `outer_step` record's workers (coordinator/observability/state_metrics.py)."""
    contributed: dict[tuple[str, str], float] = {}
    taking_part_set: set[str] = set()
    for institution, device, seconds in results:
        key = (institution, device)
        contributed[key] = contributed.get(key, 0.0) + seconds
        taking_part_set.add(institution)
    taking_part = sorted(taking_part_set)
    consumed: dict[tuple[str, str], float] = {}
    for device in ("cpu", "gpu"):
        total = sum(s for (_, d), s in contributed.items() if d == device)
        if total:
            for institution in taking_part:
                consumed[(institution, device)] = total / len(taking_part)
    return contributed, consumed


def account(job: str, records: Iterable[OuterStepRecord]) -> JobAccounting:
    institutions: dict[str, InstitutionContribution] = {}
    for record in records:
        _, consumed = step_compute(record)
        for (institution, device), seconds in consumed.items():
            entry = institutions.setdefault(institution, InstitutionContribution(institution))
            if device == "gpu":
                entry.consumed_gpu_s += seconds
            else:
                entry.consumed_cpu_s += seconds
        seen: set[str] = set()
        for result in record.results:
            entry = institutions.setdefault(
                result.institution, InstitutionContribution(result.institution)
            )
            if result.device == "gpu":
                entry.gpu_s += result.compute_s
            else:
                entry.cpu_s += result.compute_s
            entry.inner_steps += result.inner_steps
            entry.tokens += result.tokens
            entry.bytes_sent += result.bytes_sent
            entry.bytes_received += result.bytes_received
            entry.workers.add(result.worker)
            if result.institution not in seen:
                entry.outer_steps += 1
                seen.add(result.institution)
    return JobAccounting(job, dict(sorted(institutions.items())))
