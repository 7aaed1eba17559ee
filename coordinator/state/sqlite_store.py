"""SQLite state store (the default; one file in the data dir, WAL mode).

The ServerApp process of a running job writes rounds into the same file as
`coordinator serve`, so connections are per thread and writes are short
transactions with a busy timeout.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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

__all__ = ["BUSY_TIMEOUT_MS", "SqliteStateStore", "now_ms"]  # now_ms: callers import it here

BUSY_TIMEOUT_MS = 10_000
# Job columns added after the first release: name -> declaration (ALTER TABLE on open).
ADDED_JOB_COLUMNS = {"submitted_by": "TEXT NOT NULL DEFAULT ''"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    institution TEXT NOT NULL,
    hostname TEXT NOT NULL,
    device TEXT NOT NULL,
    state TEXT NOT NULL,
    registered_at_ms INTEGER NOT NULL,
    last_heartbeat_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    spec_toml TEXT NOT NULL,
    state TEXT NOT NULL,
    rounds_total INTEGER NOT NULL,
    rounds_completed INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    created_at_ms INTEGER NOT NULL,
    started_at_ms INTEGER NOT NULL DEFAULT 0,
    finished_at_ms INTEGER NOT NULL DEFAULT 0,
    model_path TEXT NOT NULL DEFAULT '',
    flower_run_id TEXT NOT NULL DEFAULT '',
    submitted_by TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS rounds (
    job_id TEXT NOT NULL REFERENCES jobs(job_id),
    round INTEGER NOT NULL,
    participants INTEGER NOT NULL,
    metrics_json TEXT NOT NULL,
    finished_at_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, round)
);
CREATE TABLE IF NOT EXISTS job_events (
    sequence INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs(job_id),
    time_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    round INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS institution_keys (
    key_id TEXT PRIMARY KEY,
    institution TEXT NOT NULL,
    public_key BLOB NOT NULL,
    registered_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS declared_examples (
    institution TEXT PRIMARY KEY,
    examples INTEGER NOT NULL,
    declared_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS update_nonces (
    job_id TEXT NOT NULL,
    nonce TEXT NOT NULL,
    PRIMARY KEY (job_id, nonce)
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    institution TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    not_after_ms INTEGER NOT NULL,
    issued_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ray_node_claims (
    claim TEXT PRIMARY KEY,
    institution TEXT NOT NULL,
    issued_at_ms INTEGER NOT NULL,
    ray_node_id TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS revocations (
    institution TEXT PRIMARY KEY,
    revoked_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS supernode_keys (
    institution TEXT NOT NULL,
    public_key TEXT NOT NULL,
    flower_node_id TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (institution, public_key)
);
CREATE TABLE IF NOT EXISTS refused_commits (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    refused_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events(job_id, sequence);
"""


class SqliteStateStore(StateStore):
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        # executescript manages its own transaction; the schema is idempotent.
        self._connection().executescript(SCHEMA)
        self._migrate()

    # --- plumbing ----------------------------------------------------------
    def _migrate(self) -> None:
        """Columns added since a data dir was created (its tables already existed)."""
        with self._transaction() as db:
            columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, ddl in ADDED_JOB_COLUMNS.items():
                if column not in columns:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {ddl}")  # fixed names

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    # --- nodes -------------------------------------------------------------
    def add_node(self, node: NodeRecord) -> None:
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM nodes WHERE node_id = ?", (node.node_id,)).fetchone():
                raise ConflictError(f"node {node.node_id!r} is already registered")
            db.execute(
                "INSERT INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    node.node_id,
                    node.institution,
                    node.hostname,
                    node.device,
                    node.state,
                    node.registered_at_ms,
                    node.last_heartbeat_ms,
                ),
            )

    def get_node(self, node_id: str) -> NodeRecord:
        row = (
            self._connection()
            .execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,))
            .fetchone()
        )
        if row is None:
            raise NotFoundError(f"node {node_id!r} is not registered")
        return _node(row)

    def touch_node(self, node_id: str, now_ms: int) -> NodeRecord:
        with self._transaction() as db:
            row = db.execute("SELECT state FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"node {node_id!r} is not registered; register again")
            if row["state"] == NodeState.GONE:
                raise ConflictError(f"node {node_id!r} has left; register again")
            db.execute(
                "UPDATE nodes SET last_heartbeat_ms = ?, state = ? WHERE node_id = ?",
                (now_ms, NodeState.ONLINE, node_id),
            )
        return self.get_node(node_id)

    def set_node_state(self, node_id: str, state: NodeState) -> NodeRecord:
        with self._transaction() as db:
            updated = db.execute(
                "UPDATE nodes SET state = ? WHERE node_id = ?", (state, node_id)
            ).rowcount
        if not updated:
            raise NotFoundError(f"node {node_id!r} is not registered")
        return self.get_node(node_id)

    def list_nodes(self) -> list[NodeRecord]:
        rows = (
            self._connection()
            .execute("SELECT * FROM nodes ORDER BY registered_at_ms, node_id")
            .fetchall()
        )
        return [_node(r) for r in rows]

    def mark_stale_nodes(self, older_than_ms: int) -> list[NodeRecord]:
        with self._transaction() as db:
            rows = db.execute(
                "SELECT node_id FROM nodes WHERE state = ? AND last_heartbeat_ms < ?",
                (NodeState.ONLINE, older_than_ms),
            ).fetchall()
            ids = [r["node_id"] for r in rows]
            db.executemany(
                "UPDATE nodes SET state = ? WHERE node_id = ?",
                [(NodeState.STALE, i) for i in ids],
            )
        return [self.get_node(i) for i in ids]

    def forget_gone_nodes(self, institution: str, keep: int) -> int:
        with self._transaction() as db:
            return db.execute(
                "DELETE FROM nodes WHERE institution = ? AND state = ? AND node_id NOT IN "
                "(SELECT node_id FROM nodes WHERE institution = ? AND state = ? "
                "ORDER BY registered_at_ms DESC, rowid DESC LIMIT ?)",
                (institution, NodeState.GONE, institution, NodeState.GONE, keep),
            ).rowcount

    # --- jobs --------------------------------------------------------------
    def add_job(self, job: JobRecord) -> None:
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job.job_id,)).fetchone():
                raise ConflictError(f"job {job.job_id!r} already exists")
            db.execute(
                "INSERT INTO jobs (job_id, name, kind, spec_toml, state, rounds_total, "
                "rounds_completed, message, created_at_ms, started_at_ms, finished_at_ms, "
                "model_path, flower_run_id, submitted_by) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.job_id,
                    job.name,
                    job.kind,
                    job.spec_toml,
                    job.state,
                    job.rounds_total,
                    job.rounds_completed,
                    job.message,
                    job.created_at_ms,
                    job.started_at_ms,
                    job.finished_at_ms,
                    job.model_path,
                    job.flower_run_id,
                    job.submitted_by,
                ),
            )
            _append_event(db, job.job_id, "job")

    def get_job(self, job_id: str) -> JobRecord:
        row = (
            self._connection().execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        )
        if row is None:
            raise NotFoundError(f"job {job_id!r} does not exist")
        return _job(row)

    def list_jobs(self, state: JobState | None = None) -> list[JobRecord]:
        if state is None:
            rows = (
                self._connection()
                .execute("SELECT * FROM jobs ORDER BY created_at_ms, rowid")
                .fetchall()
            )
        else:
            rows = (
                self._connection()
                .execute(
                    "SELECT * FROM jobs WHERE state = ? ORDER BY created_at_ms, rowid", (state,)
                )
                .fetchall()
            )
        return [_job(r) for r in rows]

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
        changes: dict[str, Any] = {
            "state": state,
            "message": message,
            "started_at_ms": started_at_ms,
            "finished_at_ms": finished_at_ms,
            "model_path": model_path,
            "flower_run_id": flower_run_id,
        }
        changes = {k: v for k, v in changes.items() if v is not None}
        with self._transaction() as db:
            row = db.execute(
                "SELECT state, message FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"job {job_id!r} does not exist")
            current = JobState(row["state"])
            if expect_states is not None and current not in expect_states:
                raise ConflictError(f"job {job_id} is {current.value}")
            if changes:
                assignments = ", ".join(f"{column} = ?" for column in changes)
                db.execute(
                    f"UPDATE jobs SET {assignments} WHERE job_id = ?",  # fixed column names
                    (*changes.values(), job_id),
                )
            # Watchers hear of a new state, and of a new message (say, why a job waits).
            if (state is not None and state != current) or (
                message is not None and message != row["message"]
            ):
                _append_event(db, job_id, "job")
        return self.get_job(job_id)

    # --- rounds ------------------------------------------------------------
    def record_round(self, record: RoundRecord) -> None:
        with self._transaction() as db:
            if not db.execute("SELECT 1 FROM jobs WHERE job_id = ?", (record.job_id,)).fetchone():
                raise NotFoundError(f"job {record.job_id!r} does not exist")
            db.execute(
                "INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?)",
                (
                    record.job_id,
                    record.round,
                    record.participants,
                    json.dumps(record.metrics, sort_keys=True),
                    record.finished_at_ms,
                ),
            )
            db.execute(
                "UPDATE jobs SET rounds_completed = MAX(rounds_completed, ?) WHERE job_id = ?",
                (record.round, record.job_id),
            )
            _append_event(db, record.job_id, "round", record.round)

    def list_rounds(self, job_id: str) -> list[RoundRecord]:
        rows = (
            self._connection()
            .execute("SELECT * FROM rounds WHERE job_id = ? ORDER BY round", (job_id,))
            .fetchall()
        )
        return [
            RoundRecord(
                job_id=r["job_id"],
                round=r["round"],
                participants=r["participants"],
                metrics=json.loads(r["metrics_json"]),
                finished_at_ms=r["finished_at_ms"],
            )
            for r in rows
        ]

    # --- institution keys and update nonces ---------------------------------
    @staticmethod
    def _require_key_not_elsewhere(db: sqlite3.Connection, institution: str, key_id: str) -> None:
        row = db.execute(
            "SELECT institution FROM institution_keys WHERE key_id = ?", (key_id,)
        ).fetchone()
        if row is not None and row["institution"] != institution:
            raise ConflictError(f"signing key {key_id[:16]} is registered to another institution")

    def add_institution_key(self, institution: str, key_id: str, public_key: bytes) -> None:
        with self._transaction() as db:
            self._require_key_not_elsewhere(db, institution, key_id)
            db.execute(
                "INSERT OR IGNORE INTO institution_keys VALUES (?, ?, ?, ?)",
                (key_id, institution, public_key, now_ms()),
            )

    def replace_institution_keys(
        self, institution: str, key_id: str, public_key: bytes
    ) -> list[str]:
        with self._transaction() as db:
            self._require_key_not_elsewhere(db, institution, key_id)
            replaced = [
                r["key_id"]
                for r in db.execute(
                    "SELECT key_id FROM institution_keys WHERE institution = ? AND key_id != ?",
                    (institution, key_id),
                )
            ]
            db.execute("DELETE FROM institution_keys WHERE institution = ?", (institution,))
            db.execute(
                "INSERT INTO institution_keys VALUES (?, ?, ?, ?)",
                (key_id, institution, public_key, now_ms()),
            )
        return sorted(replaced)

    def institution_keys(self, institution: str) -> dict[str, bytes]:
        rows = (
            self._connection()
            .execute(
                "SELECT key_id, public_key FROM institution_keys WHERE institution = ?",
                (institution,),
            )
            .fetchall()
        )
        return {r["key_id"]: bytes(r["public_key"]) for r in rows}

    def record_refused_commit(self, job_id: str, round_: int, run_id: str, reason: str) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO refused_commits VALUES (?, ?, ?, ?, ?)",
                (job_id, round_, run_id, reason, now_ms()),
            )

    def refused_commits(self) -> dict[str, int]:
        rows = (
            self._connection()
            .execute("SELECT reason, COUNT(*) AS n FROM refused_commits GROUP BY reason")
            .fetchall()
        )
        return {r["reason"]: int(r["n"]) for r in rows}

    def claim_nonce(self, job_id: str, nonce: str) -> bool:
        """True the first time a nonce is seen for a job, False on a replay."""
        with self._transaction() as db:
            inserted = db.execute(
                "INSERT OR IGNORE INTO update_nonces VALUES (?, ?)", (job_id, nonce)
            ).rowcount
        return bool(inserted)

    def declare_examples(self, institution: str, examples: int) -> int:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO declared_examples VALUES (?, ?, ?) "
                "ON CONFLICT(institution) DO NOTHING",
                (institution, examples, now_ms()),
            )
            row = db.execute(
                "SELECT examples FROM declared_examples WHERE institution = ?", (institution,)
            ).fetchone()
        return int(row["examples"])

    def declared_examples(self, institution: str) -> int | None:
        row = (
            self._connection()
            .execute("SELECT examples FROM declared_examples WHERE institution = ?", (institution,))
            .fetchone()
        )
        return None if row is None else int(row["examples"])

    # --- onboarding: certificates, revocations, SuperNode keys -------------
    def add_certificate(
        self, serial: str, institution: str, fingerprint: str, not_after_ms: int
    ) -> None:
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM certificates WHERE serial = ?", (serial,)).fetchone():
                raise ConflictError(f"certificate serial {serial} was already issued")
            db.execute(
                "INSERT INTO certificates VALUES (?, ?, ?, ?, ?)",
                (serial, institution, fingerprint, not_after_ms, now_ms()),
            )

    def institutions(self) -> list[str]:
        rows = (
            self._connection()
            .execute("SELECT DISTINCT institution FROM certificates ORDER BY institution")
            .fetchall()
        )
        return [r["institution"] for r in rows]

    def current_certificate_serial(self, institution: str) -> str | None:
        row = (
            self._connection()
            .execute(
                "SELECT serial FROM certificates WHERE institution = ? "
                "ORDER BY issued_at_ms DESC, rowid DESC LIMIT 1",
                (institution,),
            )
            .fetchone()
        )
        return None if row is None else str(row["serial"])

    def revoke_institution(self, institution: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO revocations VALUES (?, ?)", (institution, now_ms()))
            db.execute(
                "UPDATE nodes SET state = ? WHERE institution = ?", (NodeState.GONE, institution)
            )

    def is_revoked(self, institution: str) -> bool:
        row = (
            self._connection()
            .execute("SELECT 1 FROM revocations WHERE institution = ?", (institution,))
            .fetchone()
        )
        return row is not None

    def revoked_institutions(self) -> frozenset[str]:
        rows = self._connection().execute("SELECT institution FROM revocations").fetchall()
        return frozenset(str(r["institution"]) for r in rows)

    def add_supernode_key(self, institution: str, public_key: str) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO supernode_keys (institution, public_key) VALUES (?, ?)",
                (institution, public_key),
            )

    def supernode_keys(self) -> list[tuple[str, str, str]]:
        """(institution, OpenSSH public key, Flower node id or '') for every key."""
        rows = (
            self._connection()
            .execute("SELECT institution, public_key, flower_node_id FROM supernode_keys")
            .fetchall()
        )
        return [(r["institution"], r["public_key"], r["flower_node_id"]) for r in rows]

    def set_supernode_node_id(self, institution: str, public_key: str, node_id: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE supernode_keys SET flower_node_id = ? "
                "WHERE institution = ? AND public_key = ?",
                (node_id, institution, public_key),
            )

    # --- Ray node claims ----------------------------------------------------
    def add_ray_node_claim(self, claim: RayNodeClaim) -> None:
        with self._transaction() as db:
            added = db.execute(
                "INSERT OR IGNORE INTO ray_node_claims (claim, institution, issued_at_ms) "
                "VALUES (?, ?, ?)",
                (claim.claim, claim.institution, claim.issued_at_ms),
            )
            if added.rowcount != 1:
                raise ConflictError(f"claim {claim.claim} was issued already")

    def bind_ray_node_claim(self, claim: str, ray_node_id: str) -> bool:
        with self._transaction() as db:
            bound = db.execute(
                "UPDATE ray_node_claims SET ray_node_id = ? WHERE claim = ? AND ray_node_id = ''",
                (ray_node_id, claim),
            )
            return bound.rowcount == 1

    def ray_node_claims(self, claims: Collection[str] | None = None) -> list[RayNodeClaim]:
        if claims is None:
            query, params = "SELECT * FROM ray_node_claims", []
        else:
            params = sorted(set(claims))
            marks = ", ".join("?" * len(params))
            query = f"SELECT * FROM ray_node_claims WHERE claim IN ({marks})"
        rows = (
            self._connection().execute(f"{query} ORDER BY issued_at_ms, claim", params).fetchall()
        )
        return [
            RayNodeClaim(r["claim"], r["institution"], r["issued_at_ms"], r["ray_node_id"])
            for r in rows
        ]

    def drop_unbound_ray_node_claims(self, issued_before_ms: int) -> int:
        with self._transaction() as db:
            dropped = db.execute(
                "DELETE FROM ray_node_claims WHERE ray_node_id = '' AND issued_at_ms < ?",
                (issued_before_ms,),
            )
            return dropped.rowcount

    # --- events ------------------------------------------------------------
    def events_after(self, job_id: str, sequence: int) -> list[JobEventRecord]:
        rows = (
            self._connection()
            .execute(
                "SELECT * FROM job_events WHERE job_id = ? AND sequence > ? ORDER BY sequence",
                (job_id, sequence),
            )
            .fetchall()
        )
        return [
            JobEventRecord(
                sequence=r["sequence"],
                job_id=r["job_id"],
                time_ms=r["time_ms"],
                kind=r["kind"],
                round=r["round"],
            )
            for r in rows
        ]


def _append_event(db: sqlite3.Connection, job_id: str, kind: str, round_: int = 0) -> None:
    db.execute(
        "INSERT INTO job_events (job_id, time_ms, kind, round) VALUES (?, ?, ?, ?)",
        (job_id, now_ms(), kind, round_),
    )


def _node(row: sqlite3.Row) -> NodeRecord:
    return NodeRecord(
        node_id=row["node_id"],
        institution=row["institution"],
        hostname=row["hostname"],
        device=row["device"],
        state=NodeState(row["state"]),
        registered_at_ms=row["registered_at_ms"],
        last_heartbeat_ms=row["last_heartbeat_ms"],
    )


def _job(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        job_id=row["job_id"],
        name=row["name"],
        kind=row["kind"],
        spec_toml=row["spec_toml"],
        state=JobState(row["state"]),
        rounds_total=row["rounds_total"],
        rounds_completed=row["rounds_completed"],
        message=row["message"],
        created_at_ms=row["created_at_ms"],
        started_at_ms=row["started_at_ms"],
        finished_at_ms=row["finished_at_ms"],
        model_path=row["model_path"],
        flower_run_id=row["flower_run_id"],
        submitted_by=row["submitted_by"],
    )
