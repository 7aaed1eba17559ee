"""The coordinator's signed approval of one Flower run, which a site checks before it
executes anything of that run.

Anyone who can reach the SuperLink's Control API (on the coordinator host) can start a
Flower run; only the coordinator's signing key can approve one. The coordinator signs
`RunApproval(run_id, fab_hash, job_id)` with its Ed25519 key when it starts a job's
run; a site fetches the statement over the mutual-TLS control plane and checks it with
the coordinator's public key from its bundle (`coordinator-signing.pub`, bound to the
pinned CA by `coordinator-signing.sig`: see `ca_endorsement_payload`).

The statement is canonical JSON under a domain tag, so a signature made for anything
else (a provenance record, say) can never pass for an approval.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from consortium.net import split_host_port
from consortium.provenance.signing import SignatureError, SigningKey, VerifyingKey

STATEMENT_TYPE = "consortium.run-approval/v1"
# In every startup bundle, beside ca.crt.
COORDINATOR_KEY_FILE = "coordinator-signing.pub"
COORDINATOR_KEY_ENDORSEMENT_FILE = "coordinator-signing.sig"
# What the CA's key signs to vouch for the coordinator's Ed25519 key (bundle file
# coordinator-signing.sig). A certificate's signed bytes are DER starting with 0x30,
# so this tagged text can never be mistaken for one.
CA_ENDORSEMENT_TAG = b"consortium coordinator signing key v1\x00"


def ca_endorsement_payload(coordinator_key: VerifyingKey) -> bytes:
    return CA_ENDORSEMENT_TAG + coordinator_key.raw


class RefusalReason(StrEnum):
    """Why a site refused a run (the `reason` label of its refusal metric)."""

    UNAPPROVED = "unapproved"  # the coordinator approved no such run
    BAD_SIGNATURE = "bad_signature"  # the statement is not signed by the coordinator
    MALFORMED = "malformed"  # the statement is not a run approval
    RUN_MISMATCH = "run_mismatch"  # an approval for another run
    FAB_MISMATCH = "fab_mismatch"  # the run carries another app than the one approved
    JOB_MISMATCH = "job_mismatch"  # the run says it serves another job
    UNREACHABLE = "unreachable"  # the coordinator could not be asked
    # the task came from a Runtime API port another local user holds, not the SuperNode
    FOREIGN_RUNTIME_API = "foreign_runtime_api"


class RunRefusedError(Exception):
    """A site must not execute this run; `reason` is a `RefusalReason`."""

    def __init__(self, reason: RefusalReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class RunApproval:
    run_id: str
    fab_hash: str  # sha256 hex of the FAB the SuperLink stored for the run
    job_id: str

    def statement(self) -> bytes:
        body = {
            "type": STATEMENT_TYPE,
            "run_id": self.run_id,
            "fab_hash": self.fab_hash,
            "job_id": self.job_id,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def sign(self, key: SigningKey) -> SignedApproval:
        statement = self.statement()
        return SignedApproval(statement, key.sign(statement))


@dataclass(frozen=True)
class SignedApproval:
    statement: bytes
    signature: bytes

    def verify(self, coordinator: VerifyingKey) -> RunApproval:
        """The approval, if the coordinator's key signed exactly these bytes."""
        try:
            coordinator.verify(self.signature, self.statement)
        except SignatureError:
            raise RunRefusedError(
                RefusalReason.BAD_SIGNATURE,
                f"the approval is not signed by the coordinator's key {coordinator.key_id[:16]}",
            ) from None
        try:
            body = json.loads(self.statement)
            if body.get("type") != STATEMENT_TYPE:
                raise ValueError(f"type {body.get('type')!r}")
            return RunApproval(str(body["run_id"]), str(body["fab_hash"]), str(body["job_id"]))
        except (ValueError, KeyError, AttributeError) as err:
            raise RunRefusedError(
                RefusalReason.MALFORMED, f"the signed statement is not a run approval: {err}"
            ) from None


def check_run(
    signed: SignedApproval,
    coordinator: VerifyingKey,
    run_id: str,
    fab_hash: str,
    job_id: str,
) -> RunApproval:
    """The approval of exactly this run, app and job; RunRefusedError otherwise."""
    approval = signed.verify(coordinator)
    if approval.run_id != run_id:
        raise RunRefusedError(
            RefusalReason.RUN_MISMATCH,
            f"the approval is for run {approval.run_id}, not run {run_id}",
        )
    if approval.fab_hash != fab_hash:
        raise RunRefusedError(
            RefusalReason.FAB_MISMATCH,
            f"run {run_id} carries app {fab_hash[:16]}, the coordinator approved "
            f"{approval.fab_hash[:16]}",
        )
    if approval.job_id != job_id:
        raise RunRefusedError(
            RefusalReason.JOB_MISMATCH,
            f"run {run_id} says it serves job {job_id!r}, the coordinator approved it "
            f"for job {approval.job_id!r}",
        )
    return approval


# A Runtime API address -> the uids of the sockets listening on its port (None: this
# system cannot say).
ListenerUids = Callable[[str], frozenset[int] | None]
PROC_NET_TCP = ("/proc/net/tcp", "/proc/net/tcp6")
TCP_LISTEN = "0A"


def listening_uids(address: str) -> frozenset[int] | None:
    """Who serves a loopback Runtime API: Flower authenticates the task taker, not the
    server, so a local user who binds the port first hands out tasks of its choosing.
    The owners of the sockets listening on `address`'s port, from Linux's
    /proc/net/tcp{,6}; None where there is no such table (not Linux)."""
    _, port = split_host_port(address)
    uids: set[int] = set()
    found_table = False
    for table in PROC_NET_TCP:
        try:
            with open(table) as handle:
                lines = handle.readlines()[1:]
        except OSError:
            continue
        found_table = True
        for line in lines:
            fields = line.split()
            if len(fields) < 8 or fields[3] != TCP_LISTEN:
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                uids.add(int(fields[7]))
    return frozenset(uids) if found_table else None


def check_runtime_api_owner(address: str, listener_uids: ListenerUids = listening_uids) -> None:
    """RunRefusedError unless every socket listening on the Runtime API's port is this
    process's own user's (its SuperNode's or SuperLink's). None from `listener_uids`
    (no /proc: not Linux) leaves nothing to check against."""
    uids = listener_uids(address)
    if uids is not None and uids != {os.getuid()}:
        raise RunRefusedError(
            RefusalReason.FOREIGN_RUNTIME_API,
            f"the Runtime API port {address} is held by uid(s) {sorted(uids)}, not this "
            f"process's user {os.getuid()}: another local user took the port",
        )
