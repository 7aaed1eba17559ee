"""Bad input gets a clear message and a documented exit code, and loses nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client.data.check import write_example
from consortium.exit_codes import ExitCode
from consortium.net import reserve_free_port
from consortium.proto.v1 import jobs_pb2, jobs_pb2_grpc
from coordinator.access.onboarding import init_consortium
from coordinator.cli.remote import Remote
from tests.conftest import Processes
from tests.helpers import run_cli, start_coordinator

VALID_JOB = """\
name = "queued"
model = "digits-cnn"
dataset = "digits"
rounds = 1
min_clients = 5
"""


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("bad-input")
    processes = Processes(root / "logs")
    try:
        yield start_coordinator(processes, root / "coordinator")
    finally:
        processes.stop_all()


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("name = 'x'\nmodel = 'digits-cnn'\ndataset = 'digits'\nrounds = 0\n", "rounds"),
        (
            "name = 'x'\nmodel = 'digits-cnn'\ndataset = 'digits'\nrounds = 2\nstrategy = 'zz'\n",
            "strategy",
        ),
        ("name = 'x'\nmodel = 'digits-cnn'\ndataset = 'mnist'\nrounds = 2\n", "dataset"),
        ("name = 'x'\nmodel = 'digits-cnn'\ndataset = 'digits'\n", "rounds"),
        (
            "name = 'x'\nmodel = 'digits-cnn'\ndataset = 'digits'\nrounds = 2\ncolour = 1\n",
            "colour",
        ),
        ("name = \n", "TOML"),
    ],
)
def test_invalid_spec_is_refused_by_cli_and_creates_no_job(
    coordinator: str, tmp_path: Path, spec: str, field: str
) -> None:
    path = tmp_path / "job.toml"
    path.write_text(spec)
    done = run_cli("coordinator", "jobs", "submit", str(path), "--coordinator", coordinator)
    assert done.returncode == ExitCode.INVALID_JOB_SPEC, done.stderr
    assert field in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    with Remote(coordinator) as remote:
        assert all(job.name != "x" for job in remote.list_jobs())


def test_invalid_spec_is_invalid_argument_over_grpc(coordinator: str) -> None:
    with grpc.insecure_channel(coordinator) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_toml="rounds = -1"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rounds" in raised.value.details()


def test_a_job_name_prints_verbatim_in_the_listing_and_the_job(coordinator: str) -> None:
    """A member names its job as it likes: what rich would read as markup or an emoji
    code neither breaks the operator's listing (a MarkupError did) nor hides text."""
    name = "x[/][white on white]hid[/]:ab:"
    with Remote(coordinator) as remote:
        job = remote.submit(VALID_JOB.replace('"queued"', json.dumps(name)))
        remote.cancel(job.job_id)
    listed = run_cli("coordinator", "jobs", "list", "--coordinator", coordinator)
    shown = run_cli("coordinator", "jobs", "show", job.job_id, "--coordinator", coordinator)

    assert listed.returncode == 0, listed.stderr
    assert shown.returncode == 0, shown.stderr
    assert name in listed.stdout
    assert shown.stdout.startswith(f"job {job.job_id} ({name}): cancelled")


def test_unknown_job_is_not_found(coordinator: str) -> None:
    done = run_cli("coordinator", "jobs", "cancel", "nope", "--coordinator", coordinator)
    assert done.returncode == ExitCode.NOT_FOUND
    assert "job 'nope' does not exist" in done.stderr


def test_queued_job_cancels_and_cannot_cancel_twice(coordinator: str) -> None:
    with Remote(coordinator) as remote:
        job = remote.submit(VALID_JOB)
        cancelled = remote.cancel(job.job_id)
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
    done = run_cli("coordinator", "jobs", "cancel", job.job_id, "--coordinator", coordinator)
    assert done.returncode == ExitCode.CONFLICT
    assert "cancelled" in done.stderr


def test_unreachable_coordinator_retries_then_fails(tmp_path: Path) -> None:
    write_example("digits", tmp_path, 1, 1)  # valid data: the check after it fails
    closed = f"127.0.0.1:{reserve_free_port()}"
    done = run_cli(
        "client",
        "join",
        "--insecure",
        "--coordinator",
        closed,
        "--institution",
        "a",
        "--data",
        str(tmp_path),
        "--state-dir",
        str(tmp_path / "state"),
        env={
            "CONSORTIUM_CLIENT_CONNECT_ATTEMPTS": "2",
            "CONSORTIUM_CLIENT_CONNECT_BACKOFF_S": "0.1",
        },
    )
    assert done.returncode == ExitCode.COORDINATOR_UNREACHABLE, done.stderr
    assert f"coordinator at {closed} did not answer after 2 attempts" in done.stderr
    assert "retry 1" in done.stdout


@pytest.mark.parametrize("make_dir", [False, True])
def test_client_with_missing_or_empty_data_dir_refuses_to_join(
    tmp_path: Path, make_dir: bool
) -> None:
    data = tmp_path / "data"
    if make_dir:
        data.mkdir()
    done = run_cli(
        "client",
        "join",
        "--insecure",
        "--coordinator",
        "127.0.0.1:1",
        "--institution",
        "a",
        "--data",
        str(data),
    )
    assert done.returncode == ExitCode.DATA_DIR_INVALID
    assert str(data) in done.stderr
    assert ("holds no dataset" if make_dir else "does not exist") in done.stderr


def test_client_asking_for_a_missing_gpu_fails_clearly(tmp_path: Path) -> None:
    write_example("digits", tmp_path, 1, 1)  # valid data: the check after it fails
    done = run_cli(
        "client",
        "join",
        "--insecure",
        "--coordinator",
        "127.0.0.1:1",
        "--institution",
        "a",
        "--data",
        str(tmp_path),
        "--gpu",
        "7",
    )
    assert done.returncode == ExitCode.GPU_UNAVAILABLE
    assert "--gpu 7" in done.stderr


def test_serve_without_pki_or_insecure_is_refused(tmp_path: Path) -> None:
    done = run_cli("coordinator", "serve", "--data-dir", str(tmp_path))
    assert done.returncode == ExitCode.SETTINGS_INVALID
    assert "run `coordinator init" in done.stderr
    assert "--insecure" in done.stderr


def test_join_without_bundle_or_insecure_is_refused(tmp_path: Path) -> None:
    write_example("digits", tmp_path, 1, 1)  # valid data: the check after it fails
    done = run_cli(
        "client",
        "join",
        "--coordinator",
        "127.0.0.1:1",
        "--institution",
        "a",
        "--data",
        str(tmp_path),
        "--state-dir",
        str(tmp_path / "state"),
    )
    assert done.returncode == ExitCode.INSECURE_TRANSPORT_REFUSED
    assert "--bundle" in done.stderr


def test_serve_insecure_off_loopback_is_refused(tmp_path: Path) -> None:
    done = run_cli(
        "coordinator",
        "serve",
        "--insecure",
        "--listen-address",
        "0.0.0.0:0",
        "--data-dir",
        str(tmp_path),
    )
    assert done.returncode == ExitCode.INSECURE_TRANSPORT_REFUSED
    assert "loopback" in done.stderr


def test_serve_with_invalid_settings_file_names_it(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text("superlink_port = 99999\n")
    done = run_cli("coordinator", "serve", "--insecure", "--config", str(config))
    assert done.returncode == ExitCode.SETTINGS_INVALID
    assert "superlink_port" in done.stderr


def test_join_with_a_bundle_path_that_does_not_exist_says_so(tmp_path: Path) -> None:
    write_example("digits", tmp_path / "data", 1, 1)
    missing = tmp_path / "bundle-typo"
    done = run_cli("client", "join", "--bundle", str(missing), "--data", str(tmp_path / "data"))
    assert done.returncode == ExitCode.SETTINGS_INVALID, done.stderr
    assert f"--bundle {missing}: no such directory" in done.stderr
    assert "Field required" not in done.stderr  # not the settings model's complaint


@pytest.mark.parametrize("make_dir", [False, True])
def test_onboard_with_a_wrong_request_folder_is_not_found_naming_it(
    tmp_path: Path, make_dir: bool
) -> None:
    data_dir = tmp_path / "consortium"
    init_consortium(data_dir, ["localhost", "127.0.0.1"], cert_days=1)
    request = tmp_path / "request-typo"
    if make_dir:
        request.mkdir()
    done = run_cli(
        "coordinator", "onboard", "beta", "--request", str(request),
        "--data-dir", str(data_dir), "--coordinator-address", "127.0.0.1:1",
    )  # fmt: skip
    assert done.returncode == ExitCode.NOT_FOUND, done.stderr
    expected = "is missing tls.csr" if make_dir else "is not a directory"
    assert expected in done.stderr and str(request) in done.stderr
    assert not (data_dir / "bundles").exists()  # nothing written for a refused request


def test_onboard_refuses_an_address_the_server_certificate_does_not_name(tmp_path: Path) -> None:
    data_dir = tmp_path / "consortium"
    init_consortium(data_dir, ["localhost", "127.0.0.1"], cert_days=1)
    done = run_cli(
        "coordinator", "onboard", "beta", "--generate-keys", str(tmp_path / "keys"),
        "--data-dir", str(data_dir), "--coordinator-address", "coordinator.example.org:50051",
    )  # fmt: skip
    assert done.returncode == ExitCode.SETTINGS_INVALID, done.stderr
    assert "'coordinator.example.org' (--coordinator-address)" in done.stderr
    assert "names only localhost, 127.0.0.1" in done.stderr
