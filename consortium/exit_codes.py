"""Numbered registry of CLI exit codes, with the help text shown to the user.

Both `coordinator` and `client` exit with these codes; `docs/operations.md`
lists them. Codes never change meaning once released.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    SUCCESS = 0
    UNEXPECTED = 1
    USAGE = 2  # typer/click's own code for a bad command line
    INVALID_JOB_SPEC = 3
    NOT_FOUND = 4
    COORDINATOR_UNREACHABLE = 5
    DATA_DIR_INVALID = 6
    GPU_UNAVAILABLE = 7
    JOB_FAILED = 8
    SETTINGS_INVALID = 9
    CONFLICT = 10
    INSECURE_TRANSPORT_REFUSED = 11
    CHILD_PROCESS_FAILED = 12
    JOB_CANCELLED = 13
    PROVENANCE_INVALID = 14
    REPLAY_MISMATCH = 15
    UNAUTHENTICATED = 16
    PERMISSION_DENIED = 17
    DEGRADED = 18
    INTERRUPTED = 130


EXIT_CODE_HELP: dict[ExitCode, str] = {
    ExitCode.SUCCESS: "Success.",
    ExitCode.UNEXPECTED: "An unexpected error; the message and the log say more.",
    ExitCode.USAGE: "The command line was malformed (unknown option, missing argument).",
    ExitCode.INVALID_JOB_SPEC: "The job spec is not valid TOML or a field is missing, "
    "unknown or out of range; the message names the field. No job was created.",
    ExitCode.NOT_FOUND: "The job, node, file or folder named does not exist.",
    ExitCode.COORDINATOR_UNREACHABLE: "The coordinator did not answer after retries; "
    "check the address and that `coordinator serve` is running.",
    ExitCode.DATA_DIR_INVALID: (
        "The data directory is missing or empty, or a dataset in it cannot be loaded or "
        "is not in the format its jobs train on (client data check says what is wrong)."
    ),
    ExitCode.GPU_UNAVAILABLE: "The GPU asked for with --gpu does not exist on this machine.",
    ExitCode.JOB_FAILED: "The job ended in the FAILED state.",
    ExitCode.SETTINGS_INVALID: "A settings file, environment variable or flag is invalid.",
    ExitCode.CONFLICT: "The request conflicts with the current state (for example "
    "cancelling a finished job, or replaying a job that is not replayable).",
    ExitCode.INSECURE_TRANSPORT_REFUSED: "Plain-text transport was refused: it needs "
    "--insecure and loopback addresses.",
    ExitCode.CHILD_PROCESS_FAILED: "A child process (Flower SuperLink or SuperNode, Ray; `ip` "
    "or `tc` building a WAN test bed) failed to start or died; the message names it.",
    ExitCode.JOB_CANCELLED: "The job ended in the CANCELLED state.",
    ExitCode.PROVENANCE_INVALID: "The provenance log failed verification; the message names "
    "the first bad line.",
    ExitCode.REPLAY_MISMATCH: "Replaying a job (a federated job's aggregation, or a "
    "pretraining job's training) did not reproduce the logged digests; the message names "
    "the round or step.",
    ExitCode.UNAUTHENTICATED: "The coordinator refused the credential (no certificate, or a "
    "revoked one), or the coordinator's own certificate is not from the bundle's CA (another "
    "consortium's bundle, or a wrong address); the message says which.",
    ExitCode.PERMISSION_DENIED: "The certificate does not allow this (e.g. acting as another "
    "institution).",
    ExitCode.DEGRADED: "`coordinator status`: a runtime of the coordinator (its SuperLink or "
    "Ray head) is not running: restarting, or failed after too many restarts.",
    ExitCode.INTERRUPTED: "Interrupted by Ctrl-C; children were stopped.",
}
