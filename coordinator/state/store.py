"""The state store interface. SQLite implements it, so does an in-memory store for tests;
a Postgres backend could. tests/unit/state/contract.py is the contract every backend passes.

Every method is atomic. Job state changes and completed rounds also append a
job event, which `WatchJob` streams in order of `sequence`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection

from coordinator.state.records import (
    JobEventRecord,
    JobRecord,
    JobState,
    NodeRecord,
    NodeState,
    RayNodeClaim,
    RoundRecord,
)


class StateStore(ABC):
    # --- nodes -------------------------------------------------------------
    @abstractmethod
    def add_node(self, node: NodeRecord) -> None:
        """ConflictError if the node id is already registered."""

    @abstractmethod
    def get_node(self, node_id: str) -> NodeRecord:
        """Raises NotFoundError."""

    @abstractmethod
    def touch_node(self, node_id: str, now_ms: int) -> NodeRecord:
        """Record a heartbeat; a stale node comes back online. Raises NotFoundError,
        ConflictError for a node that has left."""

    @abstractmethod
    def set_node_state(self, node_id: str, state: NodeState) -> NodeRecord:
        """Raises NotFoundError."""

    @abstractmethod
    def list_nodes(self) -> list[NodeRecord]: ...

    @abstractmethod
    def mark_stale_nodes(self, older_than_ms: int) -> list[NodeRecord]:
        """Online nodes whose last heartbeat is older than the bound become stale."""

    @abstractmethod
    def forget_gone_nodes(self, institution: str, keep: int) -> int:
        """Delete the institution's gone nodes but the `keep` registered last (a node
        never comes back from gone, so only the listing loses them); how many."""

    # --- jobs --------------------------------------------------------------
    @abstractmethod
    def add_job(self, job: JobRecord) -> None:
        """ConflictError if the job id exists; appends the job's first event."""

    @abstractmethod
    def get_job(self, job_id: str) -> JobRecord:
        """Raises NotFoundError."""

    @abstractmethod
    def list_jobs(self, state: JobState | None = None) -> list[JobRecord]:
        """Oldest first."""

    @abstractmethod
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
        """Change fields; with `expect_states`, only if the job is in one of them
        (else ConflictError). A state change appends a job event."""

    # --- rounds ------------------------------------------------------------
    @abstractmethod
    def record_round(self, record: RoundRecord) -> None:
        """Store a completed round (idempotent per (job, round)), bump the job's
        `rounds_completed` and append a round event. NotFoundError for an unknown job."""

    @abstractmethod
    def list_rounds(self, job_id: str) -> list[RoundRecord]: ...

    @abstractmethod
    def record_refused_commit(self, job_id: str, round_: int, run_id: str, reason: str) -> None:
        """A run's commit that was refused (a stale run, a round already committed):
        kept for the operator and counted by reason."""

    @abstractmethod
    def refused_commits(self) -> dict[str, int]:
        """How many commits were refused, by reason."""

    # --- institution keys and update nonces ---------------------------------
    @abstractmethod
    def add_institution_key(self, institution: str, key_id: str, public_key: bytes) -> None:
        """Register a signing key; ConflictError if it belongs to another institution."""

    @abstractmethod
    def institution_keys(self, institution: str) -> dict[str, bytes]:
        """key id -> raw public key, for every key the institution registered."""

    @abstractmethod
    def replace_institution_keys(
        self, institution: str, key_id: str, public_key: bytes
    ) -> list[str]:
        """Make this the institution's only signing key, in one transaction; returns the
        ids of the keys it replaced. ConflictError if the key is another institution's."""

    @abstractmethod
    def claim_nonce(self, job_id: str, nonce: str) -> bool:
        """True the first time a nonce is seen for a job, False on a replay."""

    @abstractmethod
    def declare_examples(self, institution: str, examples: int) -> int:
        """Record the examples a joining node of the institution holds (`examples` > 0)
        if it is the institution's first declaration; returns the institution's cap,
        which is that first declaration for good: a later node can neither raise it
        (mid-job, to weigh more) nor lower it (making a larger node's honest updates
        look inflated)."""

    @abstractmethod
    def declared_examples(self, institution: str) -> int | None:
        """The institution's cap on an update's example count; None if it declared none."""

    # --- onboarding: certificates, revocations, SuperNode keys -------------
    @abstractmethod
    def add_certificate(
        self, serial: str, institution: str, fingerprint: str, not_after_ms: int
    ) -> None:
        """ConflictError if the serial was already issued."""

    @abstractmethod
    def institutions(self) -> list[str]:
        """Every institution a certificate was issued to."""

    @abstractmethod
    def current_certificate_serial(self, institution: str) -> str | None:
        """The serial of the institution's latest certificate (a renewal supersedes the
        ones before it); None if none was issued to that name."""

    @abstractmethod
    def revoke_institution(self, institution: str) -> None:
        """Deny-list the institution and mark its nodes gone."""

    @abstractmethod
    def is_revoked(self, institution: str) -> bool: ...

    @abstractmethod
    def revoked_institutions(self) -> frozenset[str]:
        """Every institution the operator revoked."""

    @abstractmethod
    def add_supernode_key(self, institution: str, public_key: str) -> None: ...

    @abstractmethod
    def supernode_keys(self) -> list[tuple[str, str, str]]:
        """(institution, OpenSSH public key, Flower node id or '') for every key."""

    @abstractmethod
    def set_supernode_node_id(self, institution: str, public_key: str, node_id: str) -> None:
        """A key that was never added is left alone."""

    # --- Ray node claims ----------------------------------------------------
    @abstractmethod
    def add_ray_node_claim(self, claim: RayNodeClaim) -> None:
        """Record an issued claim (unbound)."""

    @abstractmethod
    def bind_ray_node_claim(self, claim: str, ray_node_id: str) -> bool:
        """Bind an unbound claim to a Ray node; False if it is unknown or bound already
        (a claim counts for one node, the first one seen)."""

    @abstractmethod
    def ray_node_claims(self, claims: Collection[str] | None = None) -> list[RayNodeClaim]:
        """The named claims that exist (every claim when None), bound or not, oldest
        first."""

    @abstractmethod
    def drop_unbound_ray_node_claims(self, issued_before_ms: int) -> int:
        """Forget claims issued before then that no node ever carried; how many."""

    # --- events ------------------------------------------------------------
    @abstractmethod
    def events_after(self, job_id: str, sequence: int) -> list[JobEventRecord]:
        """Events of one job with a sequence above the given one, in order; sequences
        start at 1 and grow across all jobs."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; a store used again afterwards reopens them."""
