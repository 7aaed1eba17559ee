"""Who contributed how much compute to a pretraining job, per institution.

Computed from the `OuterStepRecord`s alone (so also from a checkpoint or a provenance
log): the wall-clock seconds of the inner loops that ran on each institution's nodes,
as CPU-seconds or GPU-seconds by the slot's device. Only work whose result entered the
average is counted; a worker lost mid-step leaves no record of what it computed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from coordinator.compute.records import OuterStepRecord


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


def account(job: str, records: Iterable[OuterStepRecord]) -> JobAccounting:
    institutions: dict[str, InstitutionContribution] = {}
    for record in records:
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
