"""A member institution attacks the control plane with its own valid certificate.

Each test performs the attack against a real mutual-TLS `coordinator serve` with two
onboarded institutions, and asserts that it failed, that nothing was written, and
that the refusal was logged and counted (docs/security.md names these tests).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from consortium.proto.v1 import jobs_pb2, nodes_pb2
from consortium.provenance.signing import SigningKey
from consortium.site_keys import create_site_keys
from consortium.tls import ClientTls
from coordinator.access.onboarding import renew, revoke
from coordinator.access.pki_files import CoordinatorPki
from coordinator.data_dir import DataDir
from coordinator.ray.tls import coordinator_ray_tls
from coordinator.state import SqliteStateStore
from tests.conftest import Processes
from tests.helpers import start_secure_consortium, wait_for_log
from tests.security.members import JOB, NAMES, Consortium, rpc_error


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    root = tmp_path_factory.mktemp("member-attacks")
    processes = Processes(root / "logs")
    try:
        data_dir, address = start_secure_consortium(processes, root, NAMES)
        yield Consortium(root, data_dir, address)
    finally:
        processes.stop_all()


def test_member_cannot_cancel_the_operators_job(consortium: Consortium) -> None:
    operator = consortium.jobs(consortium.as_operator())
    job = operator.SubmitJob(jobs_pb2.SubmitJobRequest(spec_toml=JOB.format(name="op", n=2))).job
    alpha = consortium.jobs(consortium.as_institution("alpha"))
    before = consortium.refusals("not_job_owner")
    error = rpc_error(lambda: alpha.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id)))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "'alpha' may not cancel job" in (error.details() or "")
    still = operator.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id)).job
    assert still.state == jobs_pb2.JOB_STATE_QUEUED
    assert consortium.refusals("not_job_owner") == before + 1
    wait_for_log(consortium.log, f"'alpha' may not cancel job {job.job_id}")
    # Its owner (the operator) still can.
    operator.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id))


def test_member_cannot_cancel_another_members_job(consortium: Consortium) -> None:
    beta = consortium.jobs(consortium.as_institution("beta"))
    job = beta.SubmitJob(jobs_pb2.SubmitJobRequest(spec_toml=JOB.format(name="b", n=2))).job
    alpha = consortium.jobs(consortium.as_institution("alpha"))
    error = rpc_error(lambda: alpha.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id)))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    reply = beta.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id))
    assert reply.job.state == jobs_pb2.JOB_STATE_CANCELLED


def test_member_cannot_add_an_update_signing_key(consortium: Consortium) -> None:
    alpha = consortium.registry(consortium.as_institution("alpha"))
    extra = SigningKey.generate().public
    before = consortium.refusals("unpinned_signing_key")
    error = rpc_error(
        lambda: alpha.RegisterNode(
            nodes_pb2.RegisterNodeRequest(
                institution="alpha", hostname="h", device="cpu", signing_public_key=extra.raw
            ),
            timeout=10,
        )
    )
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    store = SqliteStateStore(DataDir(consortium.data_dir).state_db)
    try:
        assert extra.key_id not in store.institution_keys("alpha")
    finally:
        store.close()
    assert consortium.refusals("unpinned_signing_key") == before + 1
    wait_for_log(consortium.log, "not pinned at onboarding")


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (JOB.format(name="huge", n=1_000_000), "min_clients"),
        (JOB.format(name="three", n=3), "min_clients"),
        (JOB.format(name="inf", n=2) + "round_timeout_s = inf\n", "round_timeout_s"),
        (JOB.format(name="nan", n=2) + "learning_rate = nan\n", "learning_rate"),
        (
            'name = "big"\nmodel = "bytelm"\ndataset = "docstrings"\nrounds = 1\n'
            "model_options = { n_layer = 128, n_head = 1, n_embd = 65536 }\n",
            "model_options",
        ),
        (JOB.format(name="deep", n=2) + "x = " + "[" * 3000 + "]" * 3000 + "\n", "nested"),
        (JOB.format(name="long", n=2) + "# padding\n" * 10_000, "limit is 65536"),
    ],
    ids=[
        "min_clients-huge",
        "min_clients-beyond-consortium",
        "inf",
        "nan",
        "model-size",
        "nesting",
        "size",
    ],
)
def test_member_spec_out_of_bounds_is_invalid_argument_and_creates_nothing(
    consortium: Consortium, spec: str, field: str
) -> None:
    alpha = consortium.jobs(consortium.as_institution("alpha"))
    before = consortium.job_count()
    error = rpc_error(lambda: alpha.SubmitJob(jobs_pb2.SubmitJobRequest(spec_toml=spec)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in (error.details() or "")
    assert consortium.job_count() == before


# --- certificates that outlived a renewal or a revocation (these run last: they change
# the institutions' standing in the shared consortium) -----------------------------------


def test_certificate_replaced_by_a_renewal_is_refused(consortium: Consortium) -> None:
    """`coordinator renew` issues alpha a new certificate; the old one, still in the old
    bundle, is refused from then on (by serial), logged and counted."""
    old = consortium.as_institution("alpha")
    site = consortium.root / "alpha-renewed"
    keys = create_site_keys(site / "state", "alpha")
    store = SqliteStateStore(DataDir(consortium.data_dir).state_db)
    try:
        renew(
            consortium.data_dir,
            store,
            "alpha",
            keys.csr,
            site / "bundle",
            consortium.address,
            cert_days=30,
        )
    finally:
        store.close()
    before = consortium.refusals("superseded_certificate")
    error = rpc_error(lambda: consortium.jobs(old).ListJobs(jobs_pb2.ListJobsRequest()))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "replaced by a renewal" in (error.details() or "")
    assert consortium.refusals("superseded_certificate") == before + 1
    wait_for_log(consortium.log, "'alpha' (serial")
    renewed = ClientTls(
        site / "bundle" / "ca.crt", site / "bundle" / "institution.crt", keys.tls_key
    )
    consortium.jobs(renewed).ListJobs(jobs_pb2.ListJobsRequest())  # the new one works


def test_revocation_ends_the_institutions_open_job_watch(consortium: Consortium) -> None:
    operator = consortium.jobs(consortium.as_operator())
    job = operator.SubmitJob(jobs_pb2.SubmitJobRequest(spec_toml=JOB.format(name="w", n=1))).job
    beta = consortium.jobs(consortium.as_institution("beta"))
    stream = beta.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), timeout=60)
    # The first event is the job as it is now: queued, or already started.
    assert next(stream).job.job_id == job.job_id
    before = consortium.refusals("revoked_certificate")
    store = SqliteStateStore(DataDir(consortium.data_dir).state_db)
    try:
        revoke(store, "beta")
    finally:
        store.close()
    error = rpc_error(lambda: list(stream))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert consortium.refusals("revoked_certificate") == before + 1
    wait_for_log(consortium.log, "ending beta's job watch, its certificate was revoked")


def test_a_certificate_the_ca_signed_for_no_member_is_refused(consortium: Consortium) -> None:
    """The coordinator's own Ray certificate chains to the CA and may log in as a client
    (Ray's mutual TLS needs it to), and its key is copied to the sandboxed Ray head and
    drivers, where a member's code can run. Taken from there to the control plane it
    is no caller at all: no certificate of its name was issued at onboarding, and it is
    not the operator's. Before, it was let through as an institution called
    "consortium-coordinator", whose Ray token a revoked member could then fetch."""
    ray_tls = coordinator_ray_tls(CoordinatorPki(consortium.data_dir))
    stolen = ClientTls(ray_tls.ca_certificate, ray_tls.certificate, ray_tls.key)
    before = consortium.refusals("unknown_certificate")
    calls = [
        lambda: consortium.jobs(stolen).ListJobs(jobs_pb2.ListJobsRequest()),
        lambda: consortium.registry(stolen).GetRayToken(
            nodes_pb2.GetRayTokenRequest(institution="consortium-coordinator")
        ),
    ]
    for call in calls:
        error = rpc_error(call)
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "not a member's or the operator's" in (error.details() or "")
    assert consortium.refusals("unknown_certificate") == before + len(calls)
    wait_for_log(consortium.log, "control plane refused consortium-coordinator")
    consortium.jobs(consortium.as_operator()).ListJobs(jobs_pb2.ListJobsRequest())  # still in
