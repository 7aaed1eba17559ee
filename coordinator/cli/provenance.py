"""`coordinator provenance verify/show/publish/export/verify-attestation/source/key`
(`coordinator replay` is in `replay.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives.serialization import Encoding
from rich.table import Table

from consortium.cli_errors import cli_errors
from consortium.console import plain_console
from consortium.errors import (
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    ProvenanceInvalidError,
)
from consortium.file_modes import replace_file
from consortium.pki import fingerprint as pki_fingerprint
from consortium.pki import load_certificate
from consortium.provenance import intoto
from consortium.provenance.attestation import (
    PREDICATE_TYPE,
    AttestationError,
    AttestationReport,
    verify_attestation,
)
from consortium.provenance.checkpoint import (
    Checkpoint,
    CheckpointError,
    Cosignature,
    ReadNote,
    note_tree_size,
    origin_of,
    read_signed_note,
    signed_note,
)
from consortium.provenance.log import TreeHead
from consortium.provenance.records import (
    JobCompleted,
    JobStarted,
    OuterStep,
    Record,
    Round,
    type_name,
)
from consortium.provenance.signing import SigningKey, VerifyingKey, unb64
from consortium.provenance.verify import LogVerificationError, VerifyReport, verify_log
from coordinator.access.pki_files import CoordinatorPki
from coordinator.data_dir import DataDir

provenance_app = typer.Typer(
    help="Verify, show and export the provenance log.", no_args_is_help=True
)
console = plain_console()
CHECKPOINT_FILE = "checkpoint"

DataDirOption = Annotated[Path, typer.Option("--data-dir", help="Coordinator data dir.")]
KeyOption = Annotated[
    Path | None,
    typer.Option("--key", help="Coordinator public key (default: <data-dir>/keys/...pub)."),
]


UnboundOption = Annotated[
    bool,
    typer.Option(
        "--allow-unbound-keys",
        help="Accept keys logged without a binding (older logs; plain-text consortia).",
    ),
]


def load_verified(
    log: Path | None,
    key: Path | None,
    data_dir: Path,
    expected: TreeHead | None = None,
    allow_unbound_keys: bool = False,
    ca: Path | None = None,
) -> tuple[Path, VerifyReport]:
    log = log or DataDir(data_dir).provenance_log
    key = key or DataDir(data_dir).signing_public_key
    if not log.exists():
        raise NotFoundError(f"provenance log {log} does not exist")
    if not key.exists():
        raise NotFoundError(f"coordinator public key {key} does not exist; pass --key")
    ca_cert = None
    if ca is not None:
        if not ca.exists():
            raise NotFoundError(f"CA certificate {ca} does not exist")
        ca_cert = load_certificate(ca)
    try:
        return log, verify_log(
            log,
            VerifyingKey.load(key),
            expected_head=expected,
            allow_unbound_keys=allow_unbound_keys,
            ca=ca_cert,
        )
    except LogVerificationError as error:
        raise ProvenanceInvalidError(f"{log}: {error}") from None


def job_records(report: VerifyReport, job_id: str) -> list[Record]:
    records = report.jobs.get(job_id)
    if not records:
        raise NotFoundError(f"the provenance log holds no record of job {job_id!r}")
    return records


@provenance_app.command("verify")
def verify(
    log: Annotated[Path | None, typer.Argument(help="Log file (default: the data dir's).")] = None,
    key: KeyOption = None,
    data_dir: DataDirOption = Path(".consortium"),
    tree_size: Annotated[int | None, typer.Option(help="A published tree head's size.")] = None,
    root_hash: Annotated[str | None, typer.Option(help="...and its root hash (hex).")] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="A checkpoint `provenance publish` wrote: the log must extend it."),
    ] = None,
    min_witnesses: Annotated[
        int, typer.Option(min=0, help="Fail unless the latest head has this many cosigners.")
    ] = 0,
    ca: Annotated[
        Path | None,
        typer.Option(help="Consortium CA certificate: check each key binding's certificate."),
    ] = None,
    allow_unbound_keys: UnboundOption = False,
    heads: Annotated[bool, typer.Option(help="List every tree head and its witnesses.")] = False,
) -> None:
    """Check every signature, the tree heads and their chain, the witnesses' cosignatures,
    the institution signatures with their bound keys, and each job's history."""
    with cli_errors():
        if (tree_size is None) != (root_hash is None):
            raise InvalidArgumentError(
                "--tree-size and --root-hash go together: pass both, from one published head"
            )
        expected = None
        if tree_size is not None and root_hash is not None:
            expected = TreeHead(tree_size, root_hash, 0)
        ca = ca if ca is not None else _default_ca(data_dir)
        path, report = load_verified(log, key, data_dir, expected, allow_unbound_keys, ca)
        head = report.last_head
        assert head is not None  # verify_log guarantees a final tree head
        if checkpoint is not None:
            _check_checkpoint(checkpoint, path, key, data_dir, report, allow_unbound_keys, ca)
        if heads:
            console.print(_heads_table(report))
        witnesses = report.witnesses_of(head)
        console.print(
            f"OK {path}: {report.records} records, {report.tree_heads} signed tree heads, "
            f"{report.signed_updates} institution-signed updates, {len(report.jobs)} job(s); "
            f"tree size {head.tree_size}, root {head.root_hash}; "
            f"cosigned by {', '.join(witnesses) if witnesses else 'no site'}"
        )
        # Never folded: the key id and fingerprint are compared by eye or copied whole.
        console.print(
            _trusted(key or DataDir(data_dir).signing_public_key, key is None, ca), soft_wrap=True
        )
        if len(witnesses) < min_witnesses:
            raise ProvenanceInvalidError(
                f"the latest tree head (size {head.tree_size}) is cosigned by "
                f"{len(witnesses)} site(s), fewer than --min-witnesses {min_witnesses}"
            )


def _trusted(key: Path, by_default: bool, ca: Path | None) -> str:
    """What the verdict rests on, said where a reader sees it: a log checks out against
    whatever key it is given, and one taken by default from a `.consortium` dir in the
    current directory may be one the log's sender put there beside it."""
    key_id = VerifyingKey.load(key).key_id
    where = f"{key} (the data dir's: pass --key with the key you hold)" if by_default else key
    line = f"trusted: coordinator key {key_id} from {where}"
    return line + (f"; CA {ca}" if ca is not None else "")


def _trusted_ca(ca: Path, by_default: bool) -> str:
    fingerprint = pki_fingerprint(load_certificate(ca))
    where = f"{ca} (the data dir's: pass --ca with the CA you hold)" if by_default else ca
    return f"trusted: CA {fingerprint} (SHA-256) from {where}"


def _default_ca(data_dir: Path) -> Path | None:
    """The data dir's CA certificate, when this is the coordinator's host."""
    ca = CoordinatorPki(data_dir).ca_cert
    return ca if ca.exists() else None


def _heads_table(report: VerifyReport) -> Table:
    table = Table("head", "tree size", "root", "cosigned by", "vouched for by")
    for number, head in enumerate(report.heads):
        table.add_row(
            str(number),
            str(head.tree_size),
            head.root_hash[:16],
            ", ".join(report.witnesses_of(head)) or "-",
            ", ".join(report.vouched_by(head)) or "-",
        )
    return table


def _check_checkpoint(
    checkpoint: Path,
    log: Path,
    key: Path | None,
    data_dir: Path,
    report: VerifyReport,
    allow_unbound_keys: bool,
    ca: Path | None,
) -> None:
    """The checkpoint's signatures (coordinator, witnesses bound in the log), then the
    log against the head it publishes: a log cut or rewritten since is caught."""
    if not checkpoint.exists():
        raise NotFoundError(f"checkpoint {checkpoint} does not exist")
    coordinator = VerifyingKey.load(key or DataDir(data_dir).signing_public_key)
    note = _read_checkpoint(checkpoint, checkpoint.read_text(), coordinator, report)
    published = TreeHead(note.checkpoint.tree_size, note.checkpoint.root_hash, 0)
    load_verified(log, key, data_dir, published, allow_unbound_keys, ca)
    console.print(
        f"the log extends checkpoint {checkpoint} (size {published.tree_size}, cosigned by "
        f"{', '.join(note.witnesses) or 'no site'})"
    )


@provenance_app.command("publish")
def publish(
    directory: Annotated[Path, typer.Argument(help="Where to write the checkpoint.")],
    data_dir: DataDirOption = Path(".consortium"),
) -> None:
    """Write the latest cosigned tree head as a C2SP checkpoint (signed note, with the
    sites' cosignatures) that anyone can archive and check a log against later."""
    with cli_errors():
        _, report = load_verified(None, None, data_dir, ca=_default_ca(data_dir))
        cosigned = [h for h in report.heads if report.witnesses_of(h)]
        if not cosigned:
            raise NotFoundError(
                "no tree head of the log is cosigned yet: sites cosign heads in the "
                "rounds of federated jobs"
            )
        head = cosigned[-1]
        key = SigningKey.load(DataDir(data_dir).signing_key)
        cosignatures = [
            Cosignature(
                c.institution,
                report.keyring.keys[c.key_id].key,
                c.timestamp_s,
                unb64(c.signature),
            )
            for c in report.cosignatures[head.tree_size]
        ]
        note = signed_note(
            Checkpoint(origin_of(key.key_id), head.tree_size, head.root_hash), key, cosignatures
        )
        replace_file(directory / CHECKPOINT_FILE, note.encode())
        replace_file(directory / "coordinator-signing.pub", key.public.pem())
        console.print(
            f"wrote {directory / CHECKPOINT_FILE}: tree size {head.tree_size}, cosigned by "
            f"{', '.join(report.witnesses_of(head))}"
        )


@provenance_app.command("show")
def show(
    job_id: str,
    log: Annotated[Path | None, typer.Option(help="Log file.")] = None,
    key: KeyOption = None,
    data_dir: DataDirOption = Path(".consortium"),
    allow_unbound_keys: UnboundOption = False,
) -> None:
    """The verified history of one job: rounds, participants, refusals, digests."""
    with cli_errors():
        _, report = load_verified(log, key, data_dir, allow_unbound_keys=allow_unbound_keys)
        table = Table("record", "round", "participants", "refused", "aggregate / model digest")
        for record in job_records(report, job_id):
            table.add_row(*_show_row(record))
        console.print(table)


CheckpointsOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--checkpoint",
        help="A published checkpoint (`provenance publish`); may be given more than once.",
    ),
]


@provenance_app.command("export")
def export(
    job_id: str,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here.")] = None,
    data_dir: DataDirOption = Path(".consortium"),
    allow_unbound_keys: UnboundOption = False,
    checkpoint: CheckpointsOption = None,
) -> None:
    """A self-contained attestation of the job's model: an in-toto Statement v1 in a DSSE
    envelope, with the job's log entries, their inclusion proofs, the signed and
    cosigned tree head and the signing key's certificate (`verify-attestation`); with
    --checkpoint, a consistency proof to each published checkpoint, so that reviewers
    holding one can tell the attestation's log is the published one."""
    from coordinator.access.onboarding import ensure_signing_certificate
    from coordinator.provenance.export import build_attestation

    with cli_errors():
        log, report = load_verified(
            None, None, data_dir, allow_unbound_keys=allow_unbound_keys, ca=_default_ca(data_dir)
        )
        key = SigningKey.load(DataDir(data_dir).signing_key)
        published = [
            (text, _read_checkpoint(path, text, key.public, report).checkpoint)
            for path, text in _checkpoint_texts(checkpoint)
        ]
        certificate = ensure_signing_certificate(data_dir)
        attestation = build_attestation(
            log, job_id, key.key_id, certificate.public_bytes(Encoding.PEM).decode(), published
        )
        body = intoto.statement(
            attestation.subject_name,
            attestation.subject_sha256,
            PREDICATE_TYPE,
            attestation.predicate,
        )
        signed = intoto.envelope(body, key)
        text = json.dumps(signed, indent=2)
        if output is None:
            console.print_json(text)
        else:
            replace_file(output, (text + "\n").encode())
            console.print(f"wrote {output}")


def _checkpoint_texts(paths: list[Path] | None) -> list[tuple[Path, str]]:
    texts = []
    for path in paths or []:
        if not path.exists():
            raise NotFoundError(f"checkpoint {path} does not exist")
        texts.append((path, path.read_text()))
    return texts


def _read_checkpoint(path: Path, text: str, key: VerifyingKey, report: VerifyReport) -> ReadNote:
    try:
        return read_signed_note(text, key, report.keyring.witness_keys(note_tree_size(text)))
    except CheckpointError as error:
        raise ProvenanceInvalidError(f"{path}: {error}") from None


@provenance_app.command("source")
def source(
    job_id: str,
    output: Annotated[Path, typer.Option("--output", "-o", help="The archive to write (.tar).")],
    data_dir: DataDirOption = Path(".consortium"),
    allow_unbound_keys: UnboundOption = False,
) -> None:
    """Write the source the job ran with as a deterministic tar; its sha256 is the one
    the job's attestation names (`reproduction.source_archive_sha256`)."""
    from consortium.provenance.environment import source_digest, write_source_archive

    with cli_errors():
        _, report = load_verified(None, None, data_dir, allow_unbound_keys=allow_unbound_keys)
        started = next((r for r in job_records(report, job_id) if isinstance(r, JobStarted)), None)
        if started is None:
            raise NotFoundError(f"the provenance log holds no job_started record of {job_id}")
        code = started.environment.get("code", {})
        here = source_digest()
        if here != code.get("source_digest"):
            raise ConflictError(
                f"the installed source (digest {here[:16]}) is not the code job {job_id} ran "
                f"(digest {str(code.get('source_digest'))[:16]}, consortium "
                f"{code.get('version')}): install that version and run this again"
            )
        sha256 = write_source_archive(output)
        console.print(
            f"wrote {output}: sha256 {sha256}; the source job {job_id} ran (digest {here[:16]})"
        )


@provenance_app.command("key")
def key_command(
    data_dir: DataDirOption = Path(".consortium"),
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the certificate here.")
    ] = None,
) -> None:
    """Print the provenance key's certificate, issued by the consortium CA, to publish."""
    from coordinator.cli.provenance_key import key

    key(data_dir, out)


@provenance_app.command("verify-attestation")
def verify_attestation_command(
    attestation: Annotated[Path, typer.Argument(help="An attestation `export` wrote.")],
    ca: Annotated[
        Path | None,
        typer.Option(help="The consortium's CA certificate (default: the data dir's)."),
    ] = None,
    data_dir: DataDirOption = Path(".consortium"),
    checkpoint: CheckpointsOption = None,
) -> None:
    """Check an attestation offline, with nothing but the consortium's CA certificate;
    with --checkpoint, also that its log is the one each checkpoint publishes."""
    with cli_errors():
        report = load_attestation(attestation, ca, data_dir, checkpoint)
        trusted_ca = ca if ca is not None else _default_ca(data_dir)
        console.print(
            f"OK {attestation}: {report.subject} (sha256 {report.sha256}) is the model of "
            f"{report.kind} job {report.job_id} after {report.rounds} round(s), in the log at "
            f"tree size {report.tree_size} (root {report.root_hash[:16]}), cosigned by "
            f"{', '.join(report.witnesses) or 'no site'}"
        )
        for size, witnesses in report.checkpoints:
            console.print(
                f"consistent with the published checkpoint at tree size {size} (cosigned by "
                f"{', '.join(witnesses) or 'no site'})"
            )
        if trusted_ca is not None:
            console.print(_trusted_ca(trusted_ca, ca is None), soft_wrap=True)


def load_attestation(
    path: Path, ca: Path | None, data_dir: Path, checkpoints: list[Path] | None = None
) -> AttestationReport:
    """A verified attestation; the CA certificate from --ca or the data dir."""
    ca = ca if ca is not None else _default_ca(data_dir)
    if ca is None or not ca.exists():
        raise NotFoundError("pass --ca: the consortium's CA certificate (ca.crt in a bundle)")
    if not path.exists():
        raise NotFoundError(f"attestation {path} does not exist")
    held = [text for _, text in _checkpoint_texts(checkpoints)]
    certificate = load_certificate(ca)
    try:
        document = json.loads(path.read_text())
    except (ValueError, RecursionError) as error:  # nesting deeper than the parser goes
        raise ProvenanceInvalidError(f"{path}: not a JSON attestation: {error}") from None
    if not isinstance(document, dict):
        raise ProvenanceInvalidError(f"{path}: not an attestation (a JSON object is expected)")
    try:
        return verify_attestation(document, certificate, held)
    except (AttestationError, ValueError) as error:
        raise ProvenanceInvalidError(f"{path}: {error}") from None
    except (KeyError, TypeError, AttributeError) as error:
        # A field missing or of another type: whoever made the file, not a bug of ours,
        # so one line and exit 14, as for any attestation that does not hold.
        raise ProvenanceInvalidError(
            f"{path}: a malformed attestation ({type(error).__name__}: {error})"
        ) from None


def _show_row(record: Record) -> tuple[str, str, str, str, str]:
    """One row of `show`: record, round, participants, refused, aggregate/model digest."""
    if isinstance(record, Round):
        refused = [
            f"{u.institution or u.node_id}: {u.reason}" for u in record.updates if not u.accepted
        ]
        return (
            type_name(record),
            str(record.round),
            ", ".join(record.participants),
            "; ".join(refused),
            record.aggregate_digest[:16],
        )
    if isinstance(record, OuterStep):
        institutions = sorted({w.institution for w in record.workers})
        lost = [f"{worker}: {why}" for worker, why in sorted(record.workers_lost.items())]
        return (
            type_name(record),
            str(record.round),
            ", ".join(institutions),
            "; ".join(lost),
            record.aggregate_digest[:16],
        )
    if isinstance(record, JobCompleted):
        return (type_name(record), "", "", "", record.final_model_digest[:16])
    return (type_name(record), "", "", "", "")
