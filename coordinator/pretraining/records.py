"""What one outer step did, as plain data (JSON round-trips; the provenance log's input),
and the controller's state: both light enough to import where no model is trained."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Literal


class ControllerState(StrEnum):
    """The DiLoCo controller's state (the diagram: coordinator/pretraining/diloco.py)."""

    RUNNING = "running"
    WAITING = "waiting"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass(frozen=True)
class WorkerStepResult:
    """One worker's contribution to one outer step (only results that were averaged)."""

    worker: str  # "<institution>/<node id prefix>/<cpu|gpu><i>"
    institution: str
    node_id: str
    device: Literal["cpu", "gpu"]
    position: int  # rank among the step's workers, sorted by id
    shard_ids: tuple[int, ...]
    seed: int  # inner-loop seed (batch sampling)
    pseudo_gradient_digest: str  # consortium.tensor_digest.arrays_digest
    bytes_received: int  # global weights fetched from the object store
    bytes_sent: int  # pseudo-gradient returned
    compute_s: float  # wall-clock seconds of the inner loop on the worker
    inner_steps: int
    tokens: int
    train_loss: float  # mean inner training loss


@dataclass(frozen=True)
class OuterStepRecord:
    step: int  # 0-based index of the outer step this record completes
    results: tuple[WorkerStepResult, ...]
    workers_lost: dict[str, str]  # worker -> why ("died: ...", "timed out", ...)
    step_seed: int
    aggregate_digest: str  # StreamingMean.digest() of the averaged pseudo-gradient
    model_digest: str  # arrays_digest of the global weights after the outer update
    val_loss: float
    wall_s: float  # seconds from dispatch to checkpoint written
    attempts: int = 1  # 1 + attempts that ended with too few results
    extra: dict[str, Any] = field(default_factory=dict)
    # Spot checks (spec.verify_fraction): the workers whose pseudo-gradient the
    # coordinator re-executed and found equal (averaged), and those it found different
    # (worker -> node id; dropped, also in workers_lost, their node barred from the job).
    verified: tuple[str, ...] = ()
    verification_failed: dict[str, str] = field(default_factory=dict)

    @property
    def workers(self) -> tuple[str, ...]:
        return tuple(r.worker for r in self.results)

    @property
    def shard_ids(self) -> dict[str, tuple[int, ...]]:
        return {r.worker: r.shard_ids for r in self.results}

    @property
    def pseudo_gradient_digests(self) -> dict[str, str]:
        return {r.worker: r.pseudo_gradient_digest for r in self.results}

    @property
    def bytes_sent(self) -> dict[str, int]:
        return {r.worker: r.bytes_sent for r in self.results}

    @property
    def bytes_received(self) -> dict[str, int]:
        return {r.worker: r.bytes_received for r in self.results}

    @property
    def compute_s(self) -> dict[str, float]:
        return {r.worker: r.compute_s for r in self.results}

    def institution_compute_s(self) -> dict[str, dict[str, float]]:
        """``{institution: {"cpu": seconds, "gpu": seconds}}`` for this step."""
        out: dict[str, dict[str, float]] = {}
        for r in self.results:
            per_device = out.setdefault(r.institution, {"cpu": 0.0, "gpu": 0.0})
            per_device[r.device] += r.compute_s
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OuterStepRecord:
        results = tuple(
            WorkerStepResult(**{**r, "shard_ids": tuple(r["shard_ids"])}) for r in data["results"]
        )
        verified = tuple(data.get("verified", ()))
        return cls(**{**data, "results": results, "verified": verified})
