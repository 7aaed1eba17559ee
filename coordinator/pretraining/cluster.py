"""Which worker slots the cluster offers, and which of them a job may use.

A *slot* is one contributed GPU, or one CPU on a node without GPUs. With mutual TLS,
the coordinator says which institution each node counts for (the claims it issued
over the control plane, coordinator/ray/claims.py), and a node it does not name offers
nothing. In a plain-text consortium, contributed nodes' own announcements count: a
custom Ray resource ``institution:<name>`` (``client join`` starts Ray with
``--resources '{"institution:<name>": 1}'`` and the label ``institution=<name>``);
nodes without one (the coordinator's own head node, typically) contribute no slots
unless asked.

A node offers no slot while Ray drains it (it is leaving, or the coordinator drains it
because its institution was revoked), nor when any institution it claims, by resource
or label, is revoked. Ray has one cluster-wide token, so it cannot tell institutions
apart; `RayClusterView` asks for the revoked ones before every plan, from the
coordinator (over its driver's socket, coordinator/pretraining/driver.py), never from
the cluster: Ray's KV store is writable by every member holding the token.

`RayClusterView` reads ``ray.nodes()``; tests and other schedulers can pass any object
with a ``slots()`` method. `ScalingPolicy` turns the slots into a decision: the workers
to use, or why the job must wait.
"""

from __future__ import annotations

import importlib
import logging
import socket
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from consortium.net import split_host_port

log = logging.getLogger(__name__)

INSTITUTION_PREFIX = "institution:"
INSTITUTION_LABEL = "institution"
NODE_ID_PREFIX_CHARS = 12
GCS_PROBE_TIMEOUT_S = 1.0


class ClusterUnreachableError(Exception):
    """The Ray head (its GCS) does not accept connections: it died or is restarting."""


def require_gcs(address: str) -> None:
    """Raise ClusterUnreachableError unless the GCS at `address` accepts a connection.

    Ray's driver-side state calls (`ray.nodes()` and friends) have no timeout: one made
    while the head is down blocks until a head answers again, and when that is a new
    head (a new cluster) Ray aborts the whole process. So look first.
    """
    try:
        with socket.create_connection(split_host_port(address), GCS_PROBE_TIMEOUT_S):
            return
    except (OSError, ValueError) as error:
        raise ClusterUnreachableError(
            f"the Ray head at {address} does not answer ({error})"
        ) from None


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
    revoked_institutions: Set[str] = frozenset(),
    draining_nodes: Set[str] = frozenset(),
    node_institutions: Mapping[str, str] | None = None,
) -> list[WorkerSlot]:
    """Slots of live nodes as listed by ``ray.nodes()``.

    ``node_institutions``: node id (hex) -> the institution the coordinator counts it
    for (its claims, coordinator/ray/claims.py). When given, it alone decides: a node
    outside it offers nothing whatever it declares, and what a node declares (resource,
    label) is ignored. None (a plain-text consortium): nodes' declarations count.

    ``device="auto"``: a node with GPUs offers one slot per GPU, else one per CPU.
    ``unaffiliated_institution``: the institution name for nodes without an
    ``institution:`` resource; ``None`` leaves them out.
    ``revoked_institutions``: a node claiming any of them (resource or label) offers
    nothing. ``draining_nodes``: ids (hex) of nodes Ray is draining; they offer nothing.
    """
    slots: list[WorkerSlot] = []
    for node in nodes:
        if not node.get("Alive", False) or str(node.get("NodeID")) in draining_nodes:
            continue
        resources: Mapping[str, float] = node.get("Resources", {})
        labels: Mapping[str, str] = node.get("Labels", {})
        node_id = str(node["NodeID"])
        resource: str | None
        if node_institutions is not None:
            institution = node_institutions.get(node_id)
            resource = None  # placed by node id alone: its announced resource is its own
        else:
            if claimed_institutions(resources, labels) & revoked_institutions:
                continue
            announced = _institution(resources)
            institution = announced if announced is not None else unaffiliated_institution
            resource = INSTITUTION_PREFIX + announced if announced is not None else None
        if institution is None or institution in revoked_institutions:
            continue
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


def claimed_institutions(
    resources: Mapping[str, float], labels: Mapping[str, str]
) -> frozenset[str]:
    """Every institution a node names: its ``institution:<name>`` resources and its
    ``institution`` label (a node may announce anything; all of it counts against it)."""
    names = {k[len(INSTITUTION_PREFIX) :] for k in resources if k.startswith(INSTITUTION_PREFIX)}
    label = labels.get(INSTITUTION_LABEL)
    if label:
        names.add(label)
    return frozenset(names)


def _institution(resources: Mapping[str, float]) -> str | None:
    prefix = len(INSTITUTION_PREFIX)
    names = sorted(k[prefix:] for k in resources if k.startswith(INSTITUTION_PREFIX))
    if len(names) > 1:
        log.warning("node announces several institutions %s; using %s", names, names[0])
    return names[0] if names else None


class RayClusterView:
    """Slots of the Ray cluster this process is connected to (``ray.init`` first).

    ``revoked_institutions`` and ``node_institutions`` are called on every call (a
    revocation or a newly claimed node takes effect at the next plan); the coordinator's
    driver passes what the coordinator last sent it.
    """

    def __init__(
        self,
        device: Literal["auto", "cpu", "gpu"] = "auto",
        unaffiliated_institution: str | None = None,
        revoked_institutions: Callable[[], Set[str]] = frozenset,
        node_institutions: Callable[[], Mapping[str, str] | None] = lambda: None,
    ) -> None:
        self.device = device
        self.unaffiliated_institution = unaffiliated_institution
        self.revoked_institutions = revoked_institutions
        self.node_institutions = node_institutions

    def slots(self) -> list[WorkerSlot]:
        # Imported here: `coordinator serve` reads claims through this module with Ray
        # off too, and importing Ray is 0.4 s of CPU at every start.
        import ray

        require_gcs(ray.get_runtime_context().gcs_address)
        nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
        # Ray's private driver-side modules have no stubs.
        state = importlib.import_module("ray._private.state").state
        draining = set(state.get_draining_nodes())
        return slots_from_nodes(
            nodes,
            self.device,
            self.unaffiliated_institution,
            self.revoked_institutions(),
            draining,
            self.node_institutions(),
        )


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
