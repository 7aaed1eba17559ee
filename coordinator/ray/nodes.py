"""The Ray cluster's nodes as the coordinator's GCS lists them, matched to the registry.

`coordinator nodes` (the `ListNodes` RPC) shows, per registry node, its process in
the Ray cluster: its state (ALIVE, DRAINING while it leaves, DEAD) and the resources
it announced. A node that joined with `client join` carries the labels
``institution=<name>`` and ``node=<first 12 characters of its registry id>``;
`match_nodes` pairs on the ``node`` label, and for a node without labels (an
institution name that is not a valid label value) on the ``institution:<name>``
resource when exactly one candidate on each side is left.

`GcsNodesView` reads the nodes straight from the GCS with Ray's own
``ray._raylet.GcsClient``: no dashboard (the head runs without one), no
``ray.init`` (the pretraining driver connects on its own), authenticated like every
Ray call of the process (`serve` runs `consortium.ray_env.use_ray_auth_in_this_process`
before it builds the view). Reads are cached for `CACHE_TTL_S`, so ``ListNodes`` stays
fast and a dead GCS costs at most one short timeout per `CACHE_TTL_S`; when Ray cannot
be read, the snapshot says why and the registry view works on without it.
"""

from __future__ import annotations

import importlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from consortium.net import split_host_port
from coordinator.state import NodeRecord, NodeState

log = logging.getLogger(__name__)

CACHE_TTL_S = 2.0  # how long one read of the GCS answers ListNodes
GCS_TIMEOUT_S = 2.0  # one GetAllNodeInfo call
CONNECT_PROBE_TIMEOUT_S = 0.5  # TCP probe before building a client (it waits 40 s otherwise)

INSTITUTION_LABEL = "institution"
NODE_LABEL = "node"
NODE_LABEL_CHARS = 12  # `client join` labels its Ray node with this much of the registry id
INSTITUTION_RESOURCE_PREFIX = "institution:"
INTERNAL_RESOURCE_PREFIX = "node:"  # Ray's per-IP marker resources; not shown

ALIVE = "ALIVE"
DRAINING = "DRAINING"
DEAD = "DEAD"
_STATE_RANK = {ALIVE: 0, DRAINING: 1, DEAD: 2}  # lower is more current


@dataclass(frozen=True)
class RayNodeInfo:
    """One node of the Ray cluster, as its GCS lists it."""

    ray_node_id: str  # hex
    state: str  # ALIVE, DRAINING or DEAD
    resources: Mapping[str, float] = field(default_factory=dict)  # totals
    labels: Mapping[str, str] = field(default_factory=dict)
    is_head: bool = False
    address: str = ""
    started_at_ms: int = 0

    @property
    def institution(self) -> str | None:
        """The ``institution`` label, else the announced ``institution:<name>`` resource."""
        label = self.labels.get(INSTITUTION_LABEL)
        if label:
            return label
        names = sorted(
            k.removeprefix(INSTITUTION_RESOURCE_PREFIX)
            for k in self.resources
            if k.startswith(INSTITUTION_RESOURCE_PREFIX)
        )
        return names[0] if names else None

    @property
    def registry_prefix(self) -> str | None:
        return self.labels.get(NODE_LABEL) or None


@dataclass(frozen=True)
class RaySnapshot:
    """Every node of the cluster at `read_at_ms`, or why they could not be read."""

    nodes: tuple[RayNodeInfo, ...]
    unavailable_reason: str = ""  # "": read
    read_at_ms: int = 0

    @property
    def available(self) -> bool:
        return not self.unavailable_reason


@dataclass(frozen=True)
class NodesMatch:
    by_registry_id: dict[str, RayNodeInfo]  # registry node id -> its most current Ray node
    unmatched: tuple[RayNodeInfo, ...]  # live Ray nodes no registry node claims


class RayNodesSource(Protocol):
    def snapshot(self) -> RaySnapshot: ...


def _more_current(node: RayNodeInfo) -> tuple[int, int]:
    return (_STATE_RANK.get(node.state, len(_STATE_RANK)), -node.started_at_ms)


def match_nodes(registry: Sequence[NodeRecord], ray_nodes: Iterable[RayNodeInfo]) -> NodesMatch:
    """Pair registry nodes with Ray nodes.

    A Ray node labelled ``node=<prefix>`` belongs to the registry node whose id starts
    with it. When several do (a node's Ray worker restarted: the old one is DEAD), the
    most current wins: ALIVE, then DRAINING, then DEAD, then the latest started.
    Unlabelled Ray nodes announcing ``institution:<name>`` pair with a registry node of
    that institution only when exactly one of each is left unpaired (live ones
    preferred on both sides). Live Ray nodes left over are `unmatched`; dead ones are
    dropped.
    """
    by_prefix: dict[str, list[NodeRecord]] = {}
    for record in registry:
        by_prefix.setdefault(record.node_id[:NODE_LABEL_CHARS], []).append(record)
    candidates: dict[str, list[RayNodeInfo]] = {}
    unlabelled: list[RayNodeInfo] = []
    leftover: list[RayNodeInfo] = []
    for node in ray_nodes:
        prefix = node.registry_prefix
        owners = by_prefix.get(prefix, []) if prefix is not None else []
        if len(owners) == 1:
            candidates.setdefault(owners[0].node_id, []).append(node)
        elif prefix is None and node.institution is not None and not node.is_head:
            unlabelled.append(node)
        else:
            leftover.append(node)
    matched = {nid: min(nodes, key=_more_current) for nid, nodes in candidates.items()}
    for institution in sorted({n.institution for n in unlabelled if n.institution}):
        ray_side = [n for n in unlabelled if n.institution == institution]
        registry_side = [
            r for r in registry if r.institution == institution and r.node_id not in matched
        ]
        live_ray = [n for n in ray_side if n.state != DEAD] or ray_side
        live_registry = [r for r in registry_side if r.state is not NodeState.GONE] or registry_side
        if len(live_ray) == 1 and len(live_registry) == 1:
            matched[live_registry[0].node_id] = live_ray[0]
            ray_side.remove(live_ray[0])
        leftover.extend(ray_side)
    unmatched = tuple(
        sorted(
            (n for n in leftover if n.state != DEAD),
            key=lambda n: (not n.is_head, n.institution or "", n.ray_node_id),
        )
    )
    return NodesMatch(matched, unmatched)


def node_from_gcs(info: Any) -> RayNodeInfo:
    """A `RayNodeInfo` from Ray's ``gcs_pb2.GcsNodeInfo`` message."""
    gcs_pb2 = importlib.import_module("ray.core.generated.gcs_pb2")  # untyped generated code
    if info.state == gcs_pb2.GcsNodeInfo.DEAD:
        state = DEAD
    elif info.state_snapshot.state == gcs_pb2.NodeSnapshot.DRAINING:
        state = DRAINING
    else:
        state = ALIVE
    resources = {
        str(k): float(v)
        for k, v in info.resources_total.items()
        if not str(k).startswith(INTERNAL_RESOURCE_PREFIX)
    }
    return RayNodeInfo(
        ray_node_id=info.node_id.hex(),
        state=state,
        resources=dict(sorted(resources.items())),
        labels=dict(sorted((str(k), str(v)) for k, v in info.labels.items())),
        is_head=bool(info.is_head_node),
        address=str(info.node_manager_address),
        started_at_ms=int(info.start_time_ms),
    )


def gcs_client(address: str) -> Any:
    """Ray's ``GcsClient`` for `address` (no ``ray.init`` needed), after a quick TCP
    probe: GcsClient waits up to 40 s for an absent GCS, a refused connection answers
    at once."""
    host, port = split_host_port(address)
    with socket.create_connection((host, port), timeout=CONNECT_PROBE_TIMEOUT_S):
        pass
    raylet = importlib.import_module("ray._raylet")  # its GcsClient has no stubs
    return raylet.GcsClient(address=address)


class GcsReader:
    """Reads every node from the GCS at `address`; raises when it cannot."""

    def __init__(self, address: str, timeout_s: float = GCS_TIMEOUT_S) -> None:
        self.address = address
        self._timeout_s = timeout_s
        self._client: Any = None

    def __call__(self) -> list[RayNodeInfo]:
        fresh = self._client is None
        if fresh:
            self._client = gcs_client(self.address)
        try:
            infos = self._client.get_all_node_info(timeout=self._timeout_s)
        except Exception:
            self._client = None
            if fresh:
                raise
            # A client from before a head restart is refused by the new head
            # (WrongClusterID): ask again at once with a fresh one.
            return self()
        return [node_from_gcs(info) for info in infos.values()]


class CachedRayNodes:
    """A `RayNodesSource` that calls `read` at most once per `ttl_s`.

    A failing read becomes a snapshot that says why (also cached, so an unreachable
    GCS is not asked again by every caller). While one thread reads, the others get
    the previous snapshot instead of waiting, when there is one.
    """

    def __init__(
        self,
        read: Callable[[], Sequence[RayNodeInfo]],
        describe: str,
        ttl_s: float = CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._describe = describe  # "the Ray GCS at host:port", for messages
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: RaySnapshot | None = None
        self._cached_at = 0.0

    def snapshot(self) -> RaySnapshot:
        fresh = self._fresh()
        if fresh is not None:
            return fresh
        previous = self._cached
        if not self._lock.acquire(blocking=previous is None):
            assert previous is not None  # only a non-blocking acquire can fail
            return previous  # another thread is reading; its result comes next time
        try:
            fresh = self._fresh()
            if fresh is not None:
                return fresh
            self._cached = self._read_now()
            self._cached_at = self._clock()
            return self._cached
        finally:
            self._lock.release()

    def _fresh(self) -> RaySnapshot | None:
        cached = self._cached
        if cached is not None and self._clock() - self._cached_at < self._ttl_s:
            return cached
        return None

    def _read_now(self) -> RaySnapshot:
        read_at = int(time.time() * 1000)
        try:
            nodes = tuple(self._read())
        except Exception as error:  # any failure: the registry view goes on without Ray
            reason = f"cannot read {self._describe}: {_describe_error(error)}"
            log.info("Ray view unavailable: %s", reason)
            return RaySnapshot((), reason, read_at)
        return RaySnapshot(nodes, "", read_at)


def _describe_error(error: Exception) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


class GcsNodesView(CachedRayNodes):
    """The nodes of the Ray cluster at `address` (GCS host:port), cached briefly.

    The process must already authenticate to the cluster
    (`consortium.ray_env.use_ray_auth_in_this_process`); a refused read shows as the
    snapshot's `unavailable_reason`.
    """

    def __init__(self, address: str, ttl_s: float = CACHE_TTL_S) -> None:
        super().__init__(GcsReader(address), f"the Ray GCS at {address}", ttl_s)


class NoRay:
    """A `RayNodesSource` for a coordinator that runs without Ray."""

    def __init__(self, reason: str) -> None:
        self._snapshot = RaySnapshot((), reason, 0)

    def snapshot(self) -> RaySnapshot:
        return self._snapshot
