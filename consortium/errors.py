"""Typed errors shared by both roles.

Domain code raises these; the API layer alone turns them into gRPC status codes
(`coordinator/api/status.py`) and the CLIs alone turn them into exit codes and
one readable line (`consortium/cli_errors.py`). Catch at the level you need::

    ConsortiumError
    ├── InvalidArgumentError        -> INVALID_ARGUMENT
    │   └── JobSpecError            (names the offending field)
    ├── NotFoundError               -> NOT_FOUND
    ├── ConflictError               -> FAILED_PRECONDITION
    ├── UnreachableError            -> (client side) coordinator did not answer
    ├── SettingsError               (bad TOML / env / flag)
    ├── InsecureTransportError      (plain text asked for off loopback or without --insecure)
    ├── DataDirError                (site data dir missing, empty or unloadable)
    ├── GpuUnavailableError         (--gpu N that does not exist)
    ├── ChildProcessFailedError     (a Flower child process failed)
    ├── UnauthenticatedError        -> UNAUTHENTICATED (no or revoked certificate)
    ├── PermissionDeniedError       -> PERMISSION_DENIED (acting as another institution)
    └── ProvenanceInvalidError      (a provenance log failed verification)
"""

from __future__ import annotations

from consortium.exit_codes import ExitCode


class ConsortiumError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code: ExitCode = ExitCode.UNEXPECTED


class InvalidArgumentError(ConsortiumError):
    exit_code = ExitCode.INVALID_JOB_SPEC


class JobSpecError(InvalidArgumentError):
    """The job spec is not valid; the message names the field."""


class UnknownWorkloadError(InvalidArgumentError):
    """No installed package registers a workload of that name, or what it registers
    does not implement the workload protocol (consortium/workloads)."""


class TaskRefusedError(InvalidArgumentError):
    """A site declines a task, and says why to the coordinator (the error reply's
    reason, which may reach the signed round records): its message names only what the
    coordinator sent and the site's published choices, never the site's data. Any
    other failure at a site is reported by its type alone (client/federated/
    task_runner.py: `told_to_coordinator`)."""


class WorkloadNotAllowedError(TaskRefusedError):
    """The site's settings do not list the workload a job asked it to run."""


class NotFoundError(ConsortiumError):
    exit_code = ExitCode.NOT_FOUND


class ConflictError(ConsortiumError):
    exit_code = ExitCode.CONFLICT


class CommitRefusedError(ConflictError):
    """A job's run tried to commit what it does not own: `reason` is "stale_run" (a
    newer run owns the job) or "duplicate_round" (the round is already committed, or
    the one before it is not)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnreachableError(ConsortiumError):
    exit_code = ExitCode.COORDINATOR_UNREACHABLE


class SettingsError(ConsortiumError):
    exit_code = ExitCode.SETTINGS_INVALID


class InsecureTransportError(ConsortiumError):
    exit_code = ExitCode.INSECURE_TRANSPORT_REFUSED


class DataDirError(ConsortiumError):
    exit_code = ExitCode.DATA_DIR_INVALID


class GpuUnavailableError(ConsortiumError):
    exit_code = ExitCode.GPU_UNAVAILABLE


class ChildProcessFailedError(ConsortiumError):
    exit_code = ExitCode.CHILD_PROCESS_FAILED


class UnauthenticatedError(ConsortiumError):
    """No acceptable credential (no certificate, or a revoked one)."""

    exit_code = ExitCode.UNAUTHENTICATED


class PermissionDeniedError(ConsortiumError):
    """Authenticated, but not allowed to do this (e.g. act as another institution)."""

    exit_code = ExitCode.PERMISSION_DENIED


class ProvenanceInvalidError(ConsortiumError):
    exit_code = ExitCode.PROVENANCE_INVALID
