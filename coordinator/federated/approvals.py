"""The runs this coordinator approved, signed, for sites to check before they execute
anything (the statement and the site's check: `consortium/run_approval.py`).

`FlowerJobRunner` approves the run it starts for a job, naming the FAB the SuperLink
stored for it; `GetRunApproval` hands the signed statement to sites. A run anyone else
starts on the SuperLink (say, with `flwr run` on the coordinator host) has no approval,
so every site refuses it. Approvals live as long as this process: the SuperLink's runs
end with it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from consortium.errors import NotFoundError
from consortium.provenance.signing import SigningKey, VerifyingKey
from consortium.run_approval import RunApproval, SignedApproval

log = logging.getLogger(__name__)


class RunApprovals:
    def __init__(self, key: SigningKey) -> None:
        self._key = key
        self._changed = threading.Condition()
        self._signed: dict[str, SignedApproval] = {}
        self._listeners: list[Callable[[], None]] = []

    @property
    def public_key(self) -> VerifyingKey:
        return self._key.public

    def approve(self, run_id: str, fab_hash: str, job_id: str) -> SignedApproval:
        signed = RunApproval(run_id, fab_hash, job_id).sign(self._key)
        with self._changed:
            self._signed[run_id] = signed
            self._changed.notify_all()
            listeners = list(self._listeners)
        for listener in listeners:
            listener()
        log.info("approved Flower run %s (app %s) for job %s", run_id, fab_hash[:16], job_id)
        return signed

    def on_approval(self, listener: Callable[[], None]) -> None:
        """Call `listener` (no arguments, quick) after every approval."""
        with self._changed:
            self._listeners.append(listener)

    def run_ids(self) -> frozenset[str]:
        """The runs approved and not withdrawn."""
        with self._changed:
            return frozenset(self._signed)

    def withdraw(self, run_id: str) -> None:
        """A run that ended (or was stopped) gets no more work from sites."""
        with self._changed:
            self._signed.pop(run_id, None)

    def wait_for(self, run_id: str, timeout_s: float) -> SignedApproval | None:
        """The run's approval once it exists (the job runner signs it right after
        the run starts, which can be after the SuperLink offers the run's task), or
        None after `timeout_s`."""
        with self._changed:
            self._changed.wait_for(lambda: run_id in self._signed, timeout_s)
            return self._signed.get(run_id)

    def get(self, run_id: str) -> SignedApproval:
        with self._changed:
            signed = self._signed.get(run_id)
        if signed is None:
            raise NotFoundError(f"the coordinator approved no Flower run {run_id!r}")
        return signed
