"""Which worker slots the cluster offers, and which of them a job may use.

A *slot* is one contributed GPU, or one CPU on a node without GPUs. Contributed nodes
announce their institution with a custom Ray resource ``institution:<name>`` (``client
join`` starts Ray with ``--resources '{"institution:<name>": 1}'``). Nodes without one
(the coordinator's own head node, typically) contribute no slots unless asked.

`RayClusterView` reads ``ray.nodes()``; tests and other schedulers can pass any object
with a ``slots()`` method. `ScalingPolicy` turns the slots into a decision: the workers
to use, or why the job must wait.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import ray

log = logging.getLogger(__name__)

INSTITUTION_PREFIX = "institution:"
NODE_ID_PREFIX_CHARS = 12


@dataclass(frozen=True, order=True)
class WorkerSlot:
    worker_id: str  # "<institution>/<node id prefix>/<cpu|gpu><index>"; sorts by institution
    institution: str
    node_id: str
    device: Literal["cpu", "gpu"]
    resource: str | None  # "institution:<name>" when the node announces it, else None


class ClusterView(Protocol):
    def slots(self) -> list[WorkerSlot]:
        """Every slot on every live node, in any order."""
        ...


def slots_from_nodes(
    nodes: Iterable[Mapping[str, Any]],
    device: Literal["auto", "cpu", "gpu"] = "auto",
    unaffiliated_institution: str | None = None,
) -> list[WorkerSlot]:
    """Slots of live nodes as listed by ``ray.nodes()``.

    ``device="auto"``: a node with GPUs offers one slot per GPU, else one per CPU.
    ``unaffiliated_institution``: the institution name for nodes without an
    ``institution:`` resource; ``None`` leaves them out.
    """
    slots: list[WorkerSlot] = []
    for node in nodes:
        if not node.get("Alive", False):
            continue
        resources: Mapping[str, float] = node.get("Resources", {})
        announced = _institution(resources)
        institution = announced if announced is not None else unaffiliated_institution
        if institution is None:
            continue
        resource = INSTITUTION_PREFIX + announced if announced is not None else None
        node_id = str(node["NodeID"])
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        if device == "gpu" or (device == "auto" and gpus > 0):
            kind: Literal["cpu", "gpu"] = "gpu"
            count = gpus
        else:
            kind, count = "cpu", cpus
        short = node_id[:NODE_ID_PREFIX_CHARS]
        slots.extend(
            WorkerSlot(f"{institution}/{short}/{kind}{i}", institution, node_id, kind, resource)
            for i in range(count)
        )
    return sorted(slots)


def _institution(resources: Mapping[str, float]) -> str | None:
    prefix = len(INSTITUTION_PREFIX)
    names = sorted(k[prefix:] for k in resources if k.startswith(INSTITUTION_PREFIX))
    if len(names) > 1:
        log.warning("node announces several institutions %s; using %s", names, names[0])
    return names[0] if names else None


class RayClusterView:
    """Slots of the Ray cluster this process is connected to (``ray.init`` first)."""

    def __init__(
        self,
        device: Literal["auto", "cpu", "gpu"] = "auto",
        unaffiliated_institution: str | None = None,
    ) -> None:
        self.device = device
        self.unaffiliated_institution = unaffiliated_institution

    def slots(self) -> list[WorkerSlot]:
        nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
        return slots_from_nodes(nodes, self.device, self.unaffiliated_institution)


@dataclass(frozen=True)
class ScalingDecision:
    workers: tuple[WorkerSlot, ...]  # sorted by worker id; empty when waiting
    waiting_reason: str | None  # None: go ahead

    @property
    def go(self) -> bool:
        return self.waiting_reason is None


class ScalingPolicy:
    """Caps per institution and in total, then the ``min_workers`` gate.

    Within an institution the first slots by id are kept; the total cap takes slots
    round-robin across institutions (each institution's first slot, then each one's
    second, ...) so one large site does not crowd out the others.
    """

    def __init__(
        self, min_workers: int, max_workers: int, per_institution_caps: Mapping[str, int]
    ) -> None:
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.caps = dict(per_institution_caps)

    def decide(self, slots: Iterable[WorkerSlot], excluded_nodes: Set[str]) -> ScalingDecision:
        by_institution: dict[str, list[WorkerSlot]] = {}
        for slot in sorted(slots):
            if slot.node_id not in excluded_nodes:
                by_institution.setdefault(slot.institution, []).append(slot)
        ranked: list[tuple[int, str, WorkerSlot]] = []
        for institution, own in by_institution.items():
            cap = self.caps.get(institution, len(own))
            ranked.extend((rank, institution, slot) for rank, slot in enumerate(own[:cap]))
        chosen = sorted(slot for _, _, slot in sorted(ranked)[: self.max_workers])
        if len(chosen) < self.min_workers:
            offered = sum(len(own) for own in by_institution.values())
            reason = (
                f"waiting for workers: {len(chosen)} usable of min_workers={self.min_workers} "
                f"({offered} slots offered by {len(by_institution)} institution(s), after "
                f"per-institution caps {self.caps or '{}'} and {len(excluded_nodes)} "
                "quarantined node(s)); add nodes or lower min_workers"
            )
            return ScalingDecision((), reason)
        return ScalingDecision(tuple(chosen), None)
