"""Job lifecycle: submit, get, list, cancel. Scheduling lives in the scheduler."""

from __future__ import annotations

import logging

from consortium.errors import JobSpecError, PermissionDeniedError
from coordinator.access.caller import current_caller, require_owner_or_operator
from coordinator.jobs.lifecycle import JobLifecycle
from coordinator.jobs.pipeline import check_init_from
from coordinator.jobs.spec import FederatedJobSpec, parse_submitted_spec
from coordinator.observability.metrics import CoordinatorMetrics
from coordinator.pretraining.spec import PretrainJobSpec
from coordinator.state import JobRecord, RoundRecord, StateStore

log = logging.getLogger(__name__)


def known_institutions(store: StateStore) -> set[str]:
    """Institutions onboarded (a certificate was issued) or that ever registered a node
    (an insecure coordinator has no onboarding)."""
    return set(store.institutions()) | {node.institution for node in store.list_nodes()}


def check_caps_name_known_institutions(store: StateStore, spec: PretrainJobSpec) -> None:
    """A cap for an institution the consortium does not know is almost certainly a typo
    that would silently cap nothing; refuse it."""
    unknown = sorted(set(spec.per_institution_caps) - known_institutions(store))
    if unknown:
        known = ", ".join(sorted(known_institutions(store))) or "none yet"
        names = ", ".join(repr(name) for name in unknown)
        raise JobSpecError(
            f"invalid pretrain job spec: field 'per_institution_caps': unknown "
            f"institution(s) {names}; known (onboarded or with a registered node): {known}"
        )


def check_min_clients_fit_the_consortium(store: StateStore, spec: FederatedJobSpec) -> None:
    """A job needing more institutions than the consortium has would hold the queue
    forever; refuse it (without onboarding or nodes yet, the spec's own bound holds)."""
    known = known_institutions(store)
    if known and spec.min_clients > len(known):
        raise JobSpecError(
            f"invalid job spec: field 'min_clients': {spec.min_clients} institutions "
            f"needed, the consortium has {len(known)}"
        )


class JobService:
    """What the control-plane API does with jobs: validate and queue, read, cancel.
    State changes go through the lifecycle; scheduling lives in the scheduler."""

    def __init__(
        self,
        store: StateStore,
        lifecycle: JobLifecycle | None = None,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self._store = store
        self._lifecycle = lifecycle or JobLifecycle(store)
        self._metrics = metrics or CoordinatorMetrics()

    def submit(self, spec_toml: str) -> JobRecord:
        """Validate and queue; an invalid spec raises JobSpecError and creates nothing.
        The one place a submitted spec is parsed and checked."""
        spec = parse_submitted_spec(spec_toml)
        if isinstance(spec, FederatedJobSpec):
            check_init_from(self._store, spec)
            check_min_clients_fit_the_consortium(self._store, spec)
        else:
            check_caps_name_known_institutions(self._store, spec)
        # A pretraining job's rounds are its outer steps.
        rounds = spec.rounds if isinstance(spec, FederatedJobSpec) else spec.outer_steps
        return self._lifecycle.submit(
            spec.name, spec.kind, spec_toml, rounds, submitted_by=current_caller() or ""
        )

    def get(self, job_id: str) -> tuple[JobRecord, list[RoundRecord]]:
        return self._store.get_job(job_id), self._store.list_rounds(job_id)

    def list(self) -> list[JobRecord]:
        return self._store.list_jobs()

    def cancel(self, job_id: str) -> JobRecord:
        """Queued jobs never start; running ones are stopped by the scheduler. An
        institution may cancel only the jobs it submitted; the operator, any."""
        job = self._store.get_job(job_id)
        try:
            require_owner_or_operator(job.submitted_by, f"cancel job {job_id}")
        except PermissionDeniedError as refused:
            log.warning("control plane refused: %s", refused)
            self._metrics.auth_refused("control_plane", "not_job_owner")
            raise
        return self._lifecycle.cancel(job_id)
