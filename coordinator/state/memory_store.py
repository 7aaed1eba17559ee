"""In-memory state store: the SQLite store's semantics without a file, for fast tests.

Same contract as `SqliteStateStore` (tests/unit/state/contract.py runs one suite against
both): the same NotFoundError / ConflictError cases, one job event per state or message
change and per recorded round, `record_round` idempotent per (job, round), nonces claimed
once, orderings as the SQL `ORDER BY` clauses give them. Nothing survives the process,
and only one process sees the data, so `coordinator serve` never uses it.

One lock guards every table, so each method is atomic like a SQLite transaction. Records
are frozen dataclasses and can be handed out as they are; the one mutable field, a round's
`metrics` dict, is copied on the way in and out.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from typing import TypeVar

from consortium.errors import ConflictError, NotFoundError
from coordinator.state.clock import now_ms
from coordinator.state.records import (
    JobEventRecord,
    JobRecord,
    JobState,
    NodeRecord,
    NodeState,
    RayNodeClaim,
    RoundRecord,
)
from coordinator.state.store import StateStore

_T = TypeVar("_T")


@dataclass(frozen=True)
class _Certificate:
    institution: str
    fingerprint: str
    not_after_ms: int
    issued_at_ms: int


class InMemoryStateStore(StateStore):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Dicts keep insertion order: it stands in for SQLite's rowid where SQL orders by it.
        self._nodes: dict[str, NodeRecord] = {}
        self._jobs: dict[str, JobRecord] = {}
        self._rounds: dict[tuple[str, int], RoundRecord] = {}
        self._events: list[JobEventRecord] = []
        self._institution_keys: dict[str, tuple[str, bytes]] = {}  # key id -> (inst, key)
        self._nonces: set[tuple[str, str]] = set()
        self._refused_commits: list[tuple[str, int, str, str]] = []
        self._declared_examples: dict[str, int] = {}
        self._certificates: dict[str, _Certificate] = {}  # serial -> certificate
        self._revoked_at_ms: dict[str, int] = {}
        self._supernode_keys: dict[tuple[str, str], str] = {}  # (inst, key) -> node id
        self._ray_node_claims: dict[str, RayNodeClaim] = {}

    def close(self) -> None:
        """Nothing to release; the data stays, as a reopened SQLite file would keep it."""

    # --- nodes -------------------------------------------------------------
    def add_node(self, node: NodeRecord) -> None:
        with self._lock:
            if node.node_id in self._nodes:
                raise ConflictError(f"node {node.node_id!r} is already registered")
            self._nodes[node.node_id] = dataclasses.replace(node, state=NodeState(node.state))

    def get_node(self, node_id: str) -> NodeRecord:
        with self._lock:
            return self._node(node_id, f"node {node_id!r} is not registered")

    def touch_node(self, node_id: str, now_ms: int) -> NodeRecord:
        with self._lock:
            node = self._node(node_id, f"node {node_id!r} is not registered; register again")
            if node.state is NodeState.GONE:
                raise ConflictError(f"node {node_id!r} has left; register again")
            touched = dataclasses.replace(node, last_heartbeat_ms=now_ms, state=NodeState.ONLINE)
            self._nodes[node_id] = touched
            return touched

    def set_node_state(self, node_id: str, state: NodeState) -> NodeRecord:
        with self._lock:
            node = self._node(node_id, f"node {node_id!r} is not registered")
            changed = dataclasses.replace(node, state=NodeState(state))
            self._nodes[node_id] = changed
            return changed

    def list_nodes(self) -> list[NodeRecord]:
        with self._lock:
            return sorted(self._nodes.values(), key=lambda n: (n.registered_at_ms, n.node_id))

    def mark_stale_nodes(self, older_than_ms: int) -> list[NodeRecord]:
        with self._lock:
            marked = [
                dataclasses.replace(node, state=NodeState.STALE)
                for node in self._nodes.values()
                if node.state is NodeState.ONLINE and node.last_heartbeat_ms < older_than_ms
            ]
            for node in marked:
                self._nodes[node.node_id] = node
            return marked

    def forget_gone_nodes(self, institution: str, keep: int) -> int:
        with self._lock:
            gone = [
                node
                for node in self._nodes.values()  # registration order, as SQLite's rowid
                if node.institution == institution and node.state is NodeState.GONE
            ]
            gone.sort(key=lambda n: n.registered_at_ms)  # stable: ties keep that order
            forget = gone[: max(len(gone) - keep, 0)]
            for node in forget:
                del self._nodes[node.node_id]
            return len(forget)

    def _node(self, node_id: str, missing: str) -> NodeRecord:
        node = self._nodes.get(node_id)
        if node is None:
            raise NotFoundError(missing)
        return node

    # --- jobs --------------------------------------------------------------
    def add_job(self, job: JobRecord) -> None:
        with self._lock:
            if job.job_id in self._jobs:
                raise ConflictError(f"job {job.job_id!r} already exists")
            self._jobs[job.job_id] = dataclasses.replace(job, state=JobState(job.state))
            self._append_event(job.job_id, "job")

    def get_job(self, job_id: str) -> JobRecord:
        with self._lock:
            return self._job(job_id)

    def list_jobs(self, state: JobState | None = None) -> list[JobRecord]:
        with self._lock:
            jobs = [j for j in self._jobs.values() if state is None or j.state == state]
        # A stable sort keeps insertion order among jobs created in the same millisecond.
        return sorted(jobs, key=lambda j: j.created_at_ms)

    def update_job(
        self,
        job_id: str,
        *,
        state: JobState | None = None,
        message: str | None = None,
        started_at_ms: int | None = None,
        finished_at_ms: int | None = None,
        model_path: str | None = None,
        flower_run_id: str | None = None,
        expect_states: frozenset[JobState] | None = None,
    ) -> JobRecord:
        with self._lock:
            current = self._job(job_id)
            if expect_states is not None and current.state not in expect_states:
                raise ConflictError(f"job {job_id} is {current.state.value}")
            updated = dataclasses.replace(
                current,
                state=current.state if state is None else JobState(state),
                message=_given(message, current.message),
                started_at_ms=_given(started_at_ms, current.started_at_ms),
                finished_at_ms=_given(finished_at_ms, current.finished_at_ms),
                model_path=_given(model_path, current.model_path),
                flower_run_id=_given(flower_run_id, current.flower_run_id),
            )
            self._jobs[job_id] = updated
            # Watchers hear of a new state, and of a new message (say, why a job waits).
            if updated.state != current.state or updated.message != current.message:
                self._append_event(job_id, "job")
            return updated

    def _job(self, job_id: str) -> JobRecord:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"job {job_id!r} does not exist")
        return job

    # --- rounds ------------------------------------------------------------
    def record_round(self, record: RoundRecord) -> None:
        with self._lock:
            job = self._job(record.job_id)
            self._rounds[(record.job_id, record.round)] = _copy_round(record)
            completed = max(job.rounds_completed, record.round)
            self._jobs[record.job_id] = dataclasses.replace(job, rounds_completed=completed)
            self._append_event(record.job_id, "round", record.round)

    def list_rounds(self, job_id: str) -> list[RoundRecord]:
        with self._lock:
            rounds = [r for (job, _), r in self._rounds.items() if job == job_id]
        return [_copy_round(r) for r in sorted(rounds, key=lambda r: r.round)]

    # --- institution keys and update nonces ---------------------------------
    def _require_key_not_elsewhere(self, institution: str, key_id: str) -> None:
        owner = self._institution_keys.get(key_id)
        if owner is not None and owner[0] != institution:
            raise ConflictError(f"signing key {key_id[:16]} is registered to another institution")

    def add_institution_key(self, institution: str, key_id: str, public_key: bytes) -> None:
        with self._lock:
            self._require_key_not_elsewhere(institution, key_id)
            # The first registration wins, as INSERT OR IGNORE keeps it.
            self._institution_keys.setdefault(key_id, (institution, bytes(public_key)))

    def replace_institution_keys(
        self, institution: str, key_id: str, public_key: bytes
    ) -> list[str]:
        with self._lock:
            self._require_key_not_elsewhere(institution, key_id)
            mine = [k for k, (inst, _) in self._institution_keys.items() if inst == institution]
            for old in mine:
                del self._institution_keys[old]
            self._institution_keys[key_id] = (institution, bytes(public_key))
            return sorted(k for k in mine if k != key_id)

    def institution_keys(self, institution: str) -> dict[str, bytes]:
        with self._lock:
            return {
                key_id: key
                for key_id, (owner, key) in self._institution_keys.items()
                if owner == institution
            }

    def record_refused_commit(self, job_id: str, round_: int, run_id: str, reason: str) -> None:
        with self._lock:
            self._refused_commits.append((job_id, round_, run_id, reason))

    def refused_commits(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(reason for *_, reason in self._refused_commits))

    def claim_nonce(self, job_id: str, nonce: str) -> bool:
        """True the first time a nonce is seen for a job, False on a replay."""
        with self._lock:
            if (job_id, nonce) in self._nonces:
                return False
            self._nonces.add((job_id, nonce))
            return True

    def declare_examples(self, institution: str, examples: int) -> int:
        with self._lock:
            return self._declared_examples.setdefault(institution, examples)

    def declared_examples(self, institution: str) -> int | None:
        with self._lock:
            return self._declared_examples.get(institution)

    # --- onboarding: certificates, revocations, SuperNode keys -------------
    def add_certificate(
        self, serial: str, institution: str, fingerprint: str, not_after_ms: int
    ) -> None:
        with self._lock:
            if serial in self._certificates:
                raise ConflictError(f"certificate serial {serial} was already issued")
            self._certificates[serial] = _Certificate(
                institution, fingerprint, not_after_ms, now_ms()
            )

    def institutions(self) -> list[str]:
        with self._lock:
            return sorted({c.institution for c in self._certificates.values()})

    def current_certificate_serial(self, institution: str) -> str | None:
        with self._lock:
            # dicts keep insertion order: the last one issued wins a tie on the clock
            serial = None
            for candidate, cert in self._certificates.items():
                if cert.institution == institution:
                    serial = candidate
            return serial

    def revoke_institution(self, institution: str) -> None:
        with self._lock:
            self._revoked_at_ms.setdefault(institution, now_ms())
            for node_id, node in self._nodes.items():
                if node.institution == institution:
                    self._nodes[node_id] = dataclasses.replace(node, state=NodeState.GONE)

    def is_revoked(self, institution: str) -> bool:
        with self._lock:
            return institution in self._revoked_at_ms

    def revoked_institutions(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._revoked_at_ms)

    def add_supernode_key(self, institution: str, public_key: str) -> None:
        with self._lock:
            self._supernode_keys.setdefault((institution, public_key), "")

    def supernode_keys(self) -> list[tuple[str, str, str]]:
        """(institution, OpenSSH public key, Flower node id or '') for every key."""
        with self._lock:
            return [(inst, key, node_id) for (inst, key), node_id in self._supernode_keys.items()]

    def set_supernode_node_id(self, institution: str, public_key: str, node_id: str) -> None:
        with self._lock:
            if (institution, public_key) in self._supernode_keys:
                self._supernode_keys[(institution, public_key)] = node_id

    # --- Ray node claims ----------------------------------------------------
    def add_ray_node_claim(self, claim: RayNodeClaim) -> None:
        with self._lock:
            if claim.claim in self._ray_node_claims:
                raise ConflictError(f"claim {claim.claim} was issued already")
            self._ray_node_claims[claim.claim] = dataclasses.replace(claim, ray_node_id="")

    def bind_ray_node_claim(self, claim: str, ray_node_id: str) -> bool:
        with self._lock:
            record = self._ray_node_claims.get(claim)
            if record is None or record.ray_node_id:
                return False
            self._ray_node_claims[claim] = dataclasses.replace(record, ray_node_id=ray_node_id)
            return True

    def ray_node_claims(self, claims: Collection[str] | None = None) -> list[RayNodeClaim]:
        with self._lock:
            wanted = [
                c for c in self._ray_node_claims.values() if claims is None or c.claim in claims
            ]
            return sorted(wanted, key=lambda c: (c.issued_at_ms, c.claim))

    def drop_unbound_ray_node_claims(self, issued_before_ms: int) -> int:
        with self._lock:
            stale = [
                c.claim
                for c in self._ray_node_claims.values()
                if not c.ray_node_id and c.issued_at_ms < issued_before_ms
            ]
            for claim in stale:
                del self._ray_node_claims[claim]
            return len(stale)

    # --- events ------------------------------------------------------------
    def events_after(self, job_id: str, sequence: int) -> list[JobEventRecord]:
        with self._lock:
            return [e for e in self._events if e.job_id == job_id and e.sequence > sequence]

    def _append_event(self, job_id: str, kind: str, round_: int = 0) -> None:
        """Sequences start at 1 and never repeat, like SQLite's AUTOINCREMENT."""
        sequence = self._events[-1].sequence + 1 if self._events else 1
        self._events.append(JobEventRecord(sequence, job_id, now_ms(), kind, round_))


def _given(value: _T | None, current: _T) -> _T:
    """`update_job` leaves a field alone when its argument is None."""
    return current if value is None else value


def _copy_round(record: RoundRecord) -> RoundRecord:
    """Metrics sorted by name, as the SQLite store's JSON column returns them."""
    return dataclasses.replace(record, metrics=dict(sorted(record.metrics.items())))
