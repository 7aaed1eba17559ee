"""A job's exported attestation verifies offline with only the consortium's CA
certificate, in the project's `verify_attestation` and in a stand-alone verifier that
shares no code with the project (tests/standalone/verify_attestation.py); and every
tampering with it is refused by both.

The consortium is real but runs no process: `init_consortium` (CA, coordinator key and
its certificate), three institutions whose update-signing keys are bound by their TLS
keys under that CA (as `coordinator onboard` logs them), a federated job written with
the real `JobRecorder` (two rounds of institution-signed updates, the model file, the
sites' cosignatures of the final head from the real `witness_head`) and a pretraining
job. Both are exported once per module with the real `coordinator provenance export`.
"""

from __future__ import annotations

import ast
import base64
import copy
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from consortium import pki
from consortium.exit_codes import ExitCode
from consortium.provenance import intoto
from consortium.provenance.attestation import PREDICATE_TYPE, AttestationError, verify_attestation
from consortium.provenance.binding import sign_binding
from consortium.provenance.canonical import canonical_json
from consortium.provenance.checkpoint import Checkpoint, origin_of, signed_note
from consortium.provenance.environment import describe_environment, source_digest_of_archive
from consortium.provenance.log import record_signing_bytes
from consortium.provenance.records import (
    InstitutionKey,
    InstitutionKeyChanged,
    JobStarted,
    KeyBinding,
    OuterStep,
    Round,
    UpdateEntry,
    WorkerEntry,
)
from consortium.provenance.signing import SigningKey, b64
from consortium.provenance.updates import UpdateStatement
from consortium.provenance.witness import witness_head
from coordinator.access.onboarding import ensure_signing_certificate, init_consortium
from coordinator.access.pki_files import CoordinatorPki
from coordinator.data_dir import DataDir
from coordinator.provenance.export import build_attestation
from coordinator.provenance.recorder import JobRecorder
from coordinator.provenance.witnessing import LogView
from tests.helpers import run_cli
from tests.provenance_keys import ScratchCa

SCRIPT = Path(__file__).resolve().parents[1] / "standalone" / "verify_attestation.py"
JOB = "fl-attested"
PRETRAIN_JOB = "pt-attested"
INSTITUTIONS = ("aurora-hospital", "borealis-university", "cascade-lab")
CERT_DAYS = 30
ROUNDS = 2

Document = dict[str, Any]


@dataclass(frozen=True)
class Consortium:
    data_dir: Path
    ca: Path  # the CA certificate, all a verifier holds
    coordinator: SigningKey  # the certified key: what an attacker re-signs with
    federated: Path  # the exported attestations
    pretrain: Path

    @property
    def ca_cert(self) -> x509.Certificate:
        return pki.load_certificate(self.ca)

    def document(self) -> Document:
        """A fresh copy of the federated job's attestation."""
        document: Document = json.loads(self.federated.read_text())
        return document


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def model(n: int) -> str:
    """The digest of the model round `n` ends with (0: the initial model)."""
    return digest(f"model after round {n}")


def bound_key(data_dir: Path, institution: str, signing: SigningKey) -> InstitutionKey:
    """The record `coordinator onboard` logs: the key, bound by the institution's TLS key,
    whose certificate the consortium's own CA issued."""
    files = CoordinatorPki(data_dir)
    ca_key, ca_cert = pki.load_private_key(files.ca_key), pki.load_certificate(files.ca_cert)
    tls_key = pki.generate_key()
    csr = pki.make_csr(tls_key, institution)
    cert = pki.sign_csr(ca_key, ca_cert, csr, institution, CERT_DAYS)
    return InstitutionKey(
        institution=institution,
        key_id=signing.key_id,
        public_key=b64(signing.public.raw),
        binding=KeyBinding(
            certificate=pki.pem(cert).decode(),
            signature=b64(sign_binding(tls_key, institution, signing.public)),
        ),
    )


def signed_update(round_: int, institution: str, key: SigningKey) -> UpdateEntry:
    """An accepted update of `institution`, signed as its ClientApp signs it."""
    statement = UpdateStatement(
        job_id=JOB,
        round=round_,
        global_digest=model(round_ - 1),
        update_digest=digest(f"update of {institution} in round {round_}"),
        num_examples=240,
        commitment=digest(f"data of {institution}"),
        nonce=digest(f"nonce {institution} {round_}")[:32],
        institution=institution,
    )
    return UpdateEntry(
        institution=institution,
        node_id=str(INSTITUTIONS.index(institution) + 1),
        accepted=True,
        key_id=key.key_id,
        update_digest=statement.update_digest,
        num_examples=statement.num_examples,
        commitment=statement.commitment,
        nonce=statement.nonce,
        signature=b64(key.sign(statement.to_bytes())),
    )


def write_federated_job(
    data_dir: Path, sites_dir: Path, rogue_ca: ScratchCa | None = None
) -> dict[str, SigningKey]:
    """Keys, two rounds, the model, the final head cosigned by every site; with
    `rogue_ca`, the first institution's key is bound under it, not the consortium's CA.
    Returns each institution's update-signing key."""
    paths = DataDir(data_dir)
    recorder = JobRecorder(paths, JOB)
    keys = {name: SigningKey.generate() for name in INSTITUTIONS}
    for name, key in keys.items():
        if rogue_ca is not None and name == INSTITUTIONS[0]:
            recorder.log.append_record(rogue_ca.bound_key(name, key))
        else:
            recorder.log.append_record(bound_key(data_dir, name, key))
        recorder.publish_tree_head()
    recorder.job_started(
        JobStarted(
            job_id=JOB,
            kind="federated",
            seed=7,
            spec={"name": "attested", "rounds": ROUNDS},
            model={"name": "bytelm", "options": {"n_layer": 2}},
            environment={"python": "3.11", "device": "cpu"},
            initial_model_digest=model(0),
        )
    )
    for n in range(1, ROUNDS + 1):
        recorder.round(
            Round(
                job_id=JOB,
                round=n,
                global_digest=model(n - 1),
                participants=sorted(keys),
                updates=[signed_update(n, name, key) for name, key in keys.items()],
                aggregate_digest=model(n),
                metrics={"eval_loss": 3.0 - n / 10, "train_loss": 2.9 - n / 10},
            )
        )
    model_file = paths.model_file(JOB)
    model_file.parent.mkdir(parents=True, exist_ok=True)
    model_file.write_bytes(b"the federated model's weights")
    recorder.job_completed("federated", ROUNDS, model(ROUNDS), model_file)
    head = LogView.read(recorder.log.path).head_lines[-1]
    assert head is not None
    coordinator = SigningKey.load(paths.signing_key).public
    cosignatures = [
        witness_head(sites_dir / name, name, key, coordinator, head.decode(), {})
        for name, key in keys.items()
    ]
    assert recorder.cosignatures(cosignatures) == len(INSTITUTIONS)
    return keys


def write_pretraining_job(data_dir: Path) -> None:
    paths = DataDir(data_dir)
    recorder = JobRecorder(paths, PRETRAIN_JOB)
    spec = {"kind": "pretrain", "model": "bytelm", "outer_steps": ROUNDS, "inner_steps": 30}
    recorder.job_started(
        JobStarted(
            job_id=PRETRAIN_JOB,
            kind="pretrain",
            seed=0,
            spec=spec,
            spec_digest=hashlib.sha256(canonical_json(spec)).hexdigest(),
            environment=describe_environment("cpu", deterministic=True),  # this installation
        )
    )
    for step in range(ROUNDS):
        workers = [
            WorkerEntry(
                worker=f"{name}/cpu0",
                institution=name,
                node_id=str(position + 1),
                device="cpu",
                position=position,
                shard_ids=[position, position + len(INSTITUTIONS)],
                seed=step * 10 + position,
                pseudo_gradient_digest=digest(f"gradient of {name} at step {step}"),
                inner_steps=30,
            )
            for position, name in enumerate(INSTITUTIONS)
        ]
        recorder.outer_step(
            OuterStep(
                job_id=PRETRAIN_JOB,
                round=step + 1,
                step=step,
                workers=workers,
                step_seed=step,
                aggregate_digest=digest(f"aggregate of step {step}"),
                model_digest=digest(f"pretrained model after step {step}"),
                val_loss=3.6 - step / 10,
            )
        )
    model_file = paths.model_file(PRETRAIN_JOB)
    model_file.write_bytes(b"the pretrained model's weights")
    final = digest(f"pretrained model after step {ROUNDS - 1}")
    recorder.job_completed(
        "pretrain", ROUNDS, final, model_file, corpus_digest=digest("corpus"), val_loss=3.5
    )


def export(data_dir: Path, job_id: str, output: Path, *options: str) -> Path:
    result = run_cli(
        "coordinator",
        "provenance",
        "export",
        job_id,
        "--data-dir",
        str(data_dir),
        *options,
        "-o",
        str(output),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return output


def attest(data_dir: Path, job_id: str) -> Document:
    """What `coordinator provenance export` writes, built in-process: the export command
    checks the log first, without the CA (it would write this attestation too)."""
    paths = DataDir(data_dir)
    key = SigningKey.load(paths.signing_key)
    certificate = pki.pem(ensure_signing_certificate(data_dir)).decode()
    attestation = build_attestation(paths.provenance_log, job_id, key.key_id, certificate)
    statement = intoto.statement(
        attestation.subject_name, attestation.subject_sha256, PREDICATE_TYPE, attestation.predicate
    )
    return intoto.envelope(statement, key)


def verify_attestation_command(attestation: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "coordinator", "provenance", "verify-attestation", str(attestation), "--ca", str(ca)
    )


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Consortium:
    root = tmp_path_factory.mktemp("attested")
    data_dir = root / "coordinator"
    files = init_consortium(data_dir, ["127.0.0.1"], cert_days=CERT_DAYS)
    write_federated_job(data_dir, root / "sites")
    write_pretraining_job(data_dir)
    return Consortium(
        data_dir=data_dir,
        ca=files.ca_cert,
        coordinator=SigningKey.load(DataDir(data_dir).signing_key),
        federated=export(data_dir, JOB, root / "federated.att.json"),
        pretrain=export(data_dir, PRETRAIN_JOB, root / "pretrain.att.json"),
    )


def run_standalone(document: Document | Path, ca: Path, tmp_path: Path) -> tuple[int, str]:
    """The stand-alone verifier in isolated mode: its exit status and its output."""
    if not isinstance(document, Path):
        path = tmp_path / "attestation.json"
        path.write_text(json.dumps(document))
        document = path
    result = subprocess.run(
        [sys.executable, "-I", str(SCRIPT), str(document), str(ca)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def statement_of(document: Document) -> dict[str, Any]:
    statement: dict[str, Any] = json.loads(base64.b64decode(document["payload"]))
    return statement


def signed(statement: dict[str, Any], key: SigningKey, keyid: bool = True) -> Document:
    """The statement in a new envelope signed by `key` (without keyid: always tried)."""
    document = intoto.envelope(statement, key)
    if not keyid:
        del document["signatures"][0]["keyid"]
    return document


def flipped(text: str) -> str:
    """Base64 `text` with one bit of its first byte flipped (still canonical base64)."""
    data = bytearray(base64.b64decode(text))
    data[0] ^= 1
    return b64(bytes(data))


def entries(statement: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = statement["predicate"]["log"]["entries"]
    return found


def first_round_entry(statement: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in entries(statement) if json.loads(e["line"])["type"] == "round")


def test_verify_attestation_command_accepts_the_export_and_names_its_witnesses(
    consortium: Consortium, tmp_path: Path
) -> None:
    # The CA from a path long enough that its line passes the 200 columns run_cli sets
    # (the fingerprint must still come out whole, not folded across lines), and holding
    # what rich would read as markup or an emoji code: it must come out verbatim.
    ca = tmp_path / ("long-" * 20 + "[white]:ab:") / "ca.crt"
    ca.parent.mkdir()
    shutil.copyfile(consortium.ca, ca)
    result = verify_attestation_command(consortium.federated, ca)

    assert result.returncode == 0, result.stdout + result.stderr
    line = " ".join(result.stdout.split())
    assert line.startswith(f"OK {consortium.federated}")
    assert f"federated job {JOB} after {ROUNDS} round(s)" in line
    assert f"cosigned by {', '.join(INSTITUTIONS)}" in line
    # What the verdict rests on: the CA given, by fingerprint, for out-of-band comparison
    fingerprint = pki.fingerprint(pki.load_certificate(ca))
    assert f"trusted: CA {fingerprint} (SHA-256) from {ca}" in result.stdout.splitlines()
    assert "the data dir's" not in line


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2]",
        "[" * 100_000 + "]" * 100_000,
        '{"payloadType": 5, "payload": [], "signatures": {}}',
        '{"payloadType": "application/vnd.in-toto+json", "payload": "e30=", "signatures": 7}',
    ],
    ids=["a list", "nested past the parser", "fields of other types", "signatures a number"],
)
def test_a_malformed_attestation_is_one_line_and_exit_14(
    consortium: Consortium, tmp_path: Path, text: str
) -> None:
    """Whoever hands a reviewer the file may make it anything: what does not parse as an
    attestation fails as one that does not verify, not with a traceback."""
    attestation = tmp_path / "attestation.dsse.json"
    attestation.write_text(text)
    result = verify_attestation_command(attestation, consortium.ca)
    assert result.returncode == ExitCode.PROVENANCE_INVALID, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"error: {attestation}:")


def test_verify_attestation_reports_the_job_its_rounds_and_witnesses(
    consortium: Consortium,
) -> None:
    report = verify_attestation(consortium.document(), consortium.ca_cert)

    model_file = DataDir(consortium.data_dir).model_file(JOB)
    assert (report.job_id, report.kind, report.rounds) == (JOB, "federated", ROUNDS)
    assert report.witnesses == sorted(INSTITUTIONS)
    assert report.subject == model_file.name
    assert report.sha256 == hashlib.sha256(model_file.read_bytes()).hexdigest()


def test_standalone_verifier_accepts_the_export(consortium: Consortium, tmp_path: Path) -> None:
    status, output = run_standalone(consortium.federated, consortium.ca, tmp_path)

    assert status == 0, output
    assert output.startswith(f"OK {JOB}.safetensors")
    assert f"cosigned by {', '.join(INSTITUTIONS)}" in output


def test_standalone_verifier_imports_only_the_standard_library_and_cryptography() -> None:
    source = SCRIPT.read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module is not None
            imported.add(node.module.split(".")[0])

    assert imported - sys.stdlib_module_names == {"cryptography"}
    assert not imported & {"consortium", "coordinator", "client", "tests", "importlib"}
    assert "__import__" not in source


def test_re_signed_untampered_statement_verifies_in_both(
    consortium: Consortium, tmp_path: Path
) -> None:
    """The control for the tampering tests below: re-signing alone breaks nothing."""
    document = signed(statement_of(consortium.document()), consortium.coordinator)

    assert verify_attestation(document, consortium.ca_cert).job_id == JOB
    assert run_standalone(document, consortium.ca, tmp_path)[0] == 0


# --- tampering -----------------------------------------------------------------------
# Each takes the honest envelope and returns a tampered one; where the attacker holds the
# coordinator's certified key (an operator), the statement is re-signed with it.


def subject_sha256_changed(document: Document, c: Consortium) -> Document:
    statement = statement_of(document)
    statement["subject"][0]["digest"]["sha256"] = digest("another model")
    return signed(statement, c.coordinator)


def subject_name_changed(document: Document, c: Consortium) -> Document:
    statement = statement_of(document)
    statement["subject"][0]["name"] = "another-model.safetensors"
    return signed(statement, c.coordinator)


def summary_metric_edited_uncertified(document: Document, c: Consortium) -> Document:
    statement = statement_of(document)
    statement["predicate"]["rounds"][0]["metrics"]["eval_loss"] = 0.01
    return signed(statement, SigningKey.generate(), keyid=False)


def edit_round_line(statement: dict[str, Any], record_key: SigningKey | None) -> None:
    """Round 1's logged eval_loss lowered; its record re-signed with `record_key`, if any."""
    entry = first_round_entry(statement)
    record = json.loads(entry["line"])
    record["body"]["metrics"]["eval_loss"] = 0.01
    if record_key is not None:
        data = record_signing_bytes(record["index"], record["type"], record["body"])
        record["signature"] = b64(record_key.sign(data))
    entry["line"] = canonical_json(record).decode()


def entry_line_edited_uncertified(document: Document, c: Consortium) -> Document:
    statement = statement_of(document)
    edit_round_line(statement, None)
    return signed(statement, SigningKey.generate(), keyid=False)


def entry_line_edited(document: Document, c: Consortium) -> Document:
    statement = statement_of(document)
    edit_round_line(statement, None)
    return signed(statement, c.coordinator)


def entry_line_rewritten_and_re_signed(document: Document, c: Consortium) -> Document:
    statement = statement_of(document)
    edit_round_line(statement, c.coordinator)
    return signed(statement, c.coordinator)


def envelope_signature_altered(document: Document, c: Consortium) -> Document:
    tampered = copy.deepcopy(document)
    tampered["signatures"][0]["sig"] = flipped(tampered["signatures"][0]["sig"])
    return tampered


def inclusion_proof_node_changed(document: Document, c: Consortium) -> Document:
    statement = statement_of(document)
    entry = first_round_entry(statement)
    node = bytearray.fromhex(entry["inclusion_proof"][0])
    node[0] ^= 1
    entry["inclusion_proof"][0] = node.hex()
    return signed(statement, c.coordinator)


def tree_head_root_changed(document: Document, c: Consortium) -> Document:
    statement = statement_of(document)
    statement["predicate"]["log"]["tree_head"]["root_hash"] = digest("another tree")
    return signed(statement, c.coordinator)


def certificate_from_another_ca(document: Document, c: Consortium) -> Document:
    """The same coordinator key, certified by a CA the verifier does not trust."""
    other_key = pki.generate_key()
    other_ca = pki.create_ca(other_key)
    public = Ed25519PublicKey.from_public_bytes(c.coordinator.public.raw)
    cert = pki.issue_signing_key_certificate(other_key, other_ca, public, CERT_DAYS)
    statement = statement_of(document)
    statement["predicate"]["coordinator"]["certificate"] = pki.pem(cert).decode()
    return signed(statement, c.coordinator)


def certificate_not_for_signing(document: Document, c: Consortium) -> Document:
    """The coordinator's key, certified by the trusted CA for key agreement only: a
    certificate for another use must not vouch for signatures."""
    pki_files = CoordinatorPki(c.data_dir)
    ca_key = pki.load_private_key(pki_files.ca_key)
    ca_cert = pki.load_certificate(pki_files.ca_cert)
    honest = pki.issue_signing_key_certificate(
        ca_key, ca_cert, Ed25519PublicKey.from_public_bytes(c.coordinator.public.raw), CERT_DAYS
    )
    uses = dict.fromkeys(KEY_USAGE_FIELDS, False)
    cert = (
        x509.CertificateBuilder(
            honest.issuer, honest.subject, honest.public_key(), honest.serial_number
        )
        .not_valid_before(honest.not_valid_before_utc)
        .not_valid_after(honest.not_valid_after_utc)
        .add_extension(x509.KeyUsage(**{**uses, "key_agreement": True}), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    statement = statement_of(document)
    statement["predicate"]["coordinator"]["certificate"] = pki.pem(cert).decode()
    return signed(statement, c.coordinator)


KEY_USAGE_FIELDS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def cosignature_altered(document: Document, c: Consortium) -> Document:
    statement = statement_of(document)
    cosignature = statement["predicate"]["log"]["cosignatures"][0]
    cosignature["signature"] = flipped(cosignature["signature"])
    return signed(statement, c.coordinator)


def job_completed_removed(document: Document, c: Consortium) -> Document:
    statement = statement_of(document)
    statement["predicate"]["log"]["entries"] = [
        e for e in entries(statement) if json.loads(e["line"])["type"] != "job_completed"
    ]
    return signed(statement, c.coordinator)


@dataclass(frozen=True)
class Tamper:
    apply: Callable[[Document, Consortium], Document]
    project_says: str  # in the AttestationError's message
    standalone_says: str  # what follows "FAILED " in the stand-alone verifier's line


NOT_SIGNED = "no signature of the envelope verifies"
# The log: the three institution keys (0-2), job_started (3), round 1 (4), ...
ROUND_1 = "entry 4: "
TAMPERS = [
    Tamper(subject_sha256_changed, "is not the model file the log names", "subject:"),
    Tamper(subject_name_changed, "is not the model file the log names", "subject:"),
    Tamper(summary_metric_edited_uncertified, NOT_SIGNED, "signature:"),
    Tamper(entry_line_edited_uncertified, NOT_SIGNED, "signature:"),
    Tamper(entry_line_edited, "log entry 4: bad signature", f"{ROUND_1}the signature"),
    Tamper(entry_line_rewritten_and_re_signed, "does not match expected root", f"{ROUND_1}its"),
    Tamper(envelope_signature_altered, NOT_SIGNED, "signature:"),
    Tamper(inclusion_proof_node_changed, "does not match expected root", f"{ROUND_1}its"),
    Tamper(tree_head_root_changed, "the tree head's signature", "tree head: the signature"),
    Tamper(certificate_from_another_ca, "was not issued by the CA", "certificate: the CA"),
    Tamper(certificate_not_for_signing, "does not allow digital", "certificate: its key usage"),
    Tamper(cosignature_altered, f"the cosignature of {INSTITUTIONS[0]!r}", "cosignature of"),
    Tamper(job_completed_removed, "holds no job_completed record", "job_completed:"),
]


@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.apply.__name__ for t in TAMPERS])
def test_tampered_attestation_is_refused_by_both_verifiers(
    consortium: Consortium, tamper: Tamper, tmp_path: Path
) -> None:
    document = tamper.apply(consortium.document(), consortium)

    with pytest.raises(AttestationError) as refused:
        verify_attestation(document, consortium.ca_cert)
    status, output = run_standalone(document, consortium.ca, tmp_path)

    assert tamper.project_says in str(refused.value)
    assert status == 1, output
    assert output.startswith(f"FAILED {tamper.standalone_says}"), output


# --- DSSE leniency -------------------------------------------------------------------


def url_safe_unpadded(document: Document) -> Document:
    def encode(text: str) -> str:
        return base64.urlsafe_b64encode(base64.b64decode(text)).decode().rstrip("=")

    signature = document["signatures"][0]
    return {
        **document,
        "payload": encode(document["payload"]),
        "signatures": [{**signature, "sig": encode(signature["sig"])}],
    }


def without_keyid(document: Document) -> Document:
    return {**document, "signatures": [{"sig": document["signatures"][0]["sig"]}]}


@pytest.mark.parametrize("variant", [url_safe_unpadded, without_keyid], ids=lambda v: v.__name__)
def test_lenient_dsse_encodings_verify_in_both_verifiers(
    consortium: Consortium, variant: Callable[[Document], Document], tmp_path: Path
) -> None:
    honest = consortium.document()
    document = variant(honest)

    assert document != honest
    assert verify_attestation(document, consortium.ca_cert).job_id == JOB
    status, output = run_standalone(document, consortium.ca, tmp_path)
    assert status == 0, output


def test_pretraining_job_attestation_verifies(consortium: Consortium, tmp_path: Path) -> None:
    result = verify_attestation_command(consortium.pretrain, consortium.ca)
    report = verify_attestation(json.loads(consortium.pretrain.read_text()), consortium.ca_cert)
    status, output = run_standalone(consortium.pretrain, consortium.ca, tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"pretrain job {PRETRAIN_JOB} after {ROUNDS} round(s)" in " ".join(result.stdout.split())
    assert (report.job_id, report.kind, report.rounds) == (PRETRAIN_JOB, "pretrain", ROUNDS)
    assert report.witnesses == []  # no federated round has cosigned a head since it ended
    assert status == 0, output


def test_key_bound_under_another_ca_is_refused_by_both_verifiers(tmp_path: Path) -> None:
    """The operator logs a site's key bound by a certificate from a CA of its own: every
    signature and proof holds, but the binding does not check against the consortium's CA."""
    data_dir = tmp_path / "coordinator"
    ca = init_consortium(data_dir, ["127.0.0.1"], cert_days=CERT_DAYS).ca_cert
    write_federated_job(data_dir, tmp_path / "sites", rogue_ca=ScratchCa.create())
    document = attest(data_dir, JOB)

    with pytest.raises(AttestationError) as refused:
        verify_attestation(document, pki.load_certificate(ca))
    status, output = run_standalone(document, ca, tmp_path)

    assert f"the key binding of {INSTITUTIONS[0]!r}" in str(refused.value)
    assert "was not issued by the CA" in str(refused.value)
    assert status == 1
    assert output.startswith(f"FAILED binding of {INSTITUTIONS[0]!r}: the CA did not issue"), output


def test_the_attestation_names_the_jobs_code_and_packages_and_source_writes_that_code(
    consortium: Consortium, tmp_path: Path
) -> None:
    """A job run here: its attestation carries the package lock (checked against the
    logged environment's digest) and the sha256 of the source archive that
    `coordinator provenance source` writes, which holds exactly the code the job ran."""
    document: Document = json.loads(consortium.pretrain.read_text())
    reproduction = statement_of(document)["predicate"]["reproduction"]
    archive = tmp_path / "source.tar"
    written = run_cli(
        "coordinator",
        "provenance",
        "source",
        PRETRAIN_JOB,
        "--data-dir",
        str(consortium.data_dir),
        "-o",
        str(archive),
    )
    federated = statement_of(consortium.document())["predicate"]["reproduction"]

    assert written.returncode == 0, written.stderr
    assert reproduction["available"] and any(
        p.startswith("torch==") for p in reproduction["packages"]
    )
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == reproduction["source_archive_sha256"]
    assert source_digest_of_archive(archive) == reproduction["source_digest"]
    # The federated job's logged environment is not this installation's: nothing claimed.
    assert federated["available"] is False and "differ" in federated["reason"]


def test_a_package_lock_that_is_not_the_jobs_is_refused(consortium: Consortium) -> None:
    statement = statement_of(json.loads(consortium.pretrain.read_text()))
    statement["predicate"]["reproduction"]["packages"].append("evil==1.0")

    with pytest.raises(AttestationError, match="package lock"):
        verify_attestation(signed(statement, consortium.coordinator), consortium.ca_cert)


# --- published checkpoints -------------------------------------------------------------
# The federated job's attestation proves into the head its sites cosigned, which is the
# checkpoint `provenance publish` writes; the pretraining job ended later, so its
# attestation proves into a later head, and only a consistency proof ties it to that
# checkpoint.


@dataclass(frozen=True)
class Published:
    checkpoint: Path  # what `coordinator provenance publish` wrote: the cosigned head
    size: int
    later: Path  # the log's latest head, as a checkpoint the coordinator signed
    later_size: int
    fork: Path  # a checkpoint of the published size with another root, also signed


def checkpoint_file(path: Path, c: Consortium, size: int, root_hash: str) -> Path:
    origin = origin_of(c.coordinator.key_id)
    path.write_text(signed_note(Checkpoint(origin, size, root_hash), c.coordinator, []))
    return path


@pytest.fixture(scope="module")
def published(consortium: Consortium, tmp_path_factory: pytest.TempPathFactory) -> Published:
    directory = tmp_path_factory.mktemp("published")
    result = run_cli(
        "coordinator",
        "provenance",
        "publish",
        str(directory),
        "--data-dir",
        str(consortium.data_dir),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    heads = [
        json.loads(line)
        for line in DataDir(consortium.data_dir).provenance_log.read_text().splitlines()
        if json.loads(line)["kind"] == "tree_head"
    ]
    cosigned = next(h for h in heads if h["tree_size"] == statement_size(consortium.federated))
    latest = heads[-1]
    return Published(
        checkpoint=directory / "checkpoint",
        size=cosigned["tree_size"],
        later=checkpoint_file(
            directory / "later", consortium, latest["tree_size"], latest["root_hash"]
        ),
        later_size=latest["tree_size"],
        fork=checkpoint_file(
            directory / "fork", consortium, cosigned["tree_size"], digest("another history")
        ),
    )


def statement_size(attestation: Path) -> int:
    statement = statement_of(json.loads(attestation.read_text()))
    size: int = statement["predicate"]["log"]["tree_head"]["tree_size"]
    return size


def export_with(c: Consortium, job_id: str, checkpoint: Path, output: Path) -> Path:
    return export(c.data_dir, job_id, output, "--checkpoint", str(checkpoint))


def verify_with(attestation: Path, c: Consortium, checkpoint: Path) -> tuple[int, str]:
    result = run_cli(
        "coordinator",
        "provenance",
        "verify-attestation",
        str(attestation),
        "--ca",
        str(c.ca),
        "--checkpoint",
        str(checkpoint),
    )
    return result.returncode, " ".join((result.stdout + result.stderr).split())


def run_standalone_with(attestation: Path, c: Consortium, checkpoint: Path) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-I", str(SCRIPT), str(attestation), str(c.ca), str(checkpoint)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def test_the_published_checkpoint_is_the_federated_jobs_cosigned_head_and_precedes_pretraining(
    consortium: Consortium, published: Published
) -> None:
    """The premise of the tests below: one job proves into the published head, the other
    into a later one."""
    assert statement_size(consortium.federated) == published.size
    assert statement_size(consortium.pretrain) == published.later_size > published.size


@pytest.mark.parametrize("job_id", [JOB, PRETRAIN_JOB])
def test_an_attestation_exported_with_the_published_checkpoint_verifies_against_it_in_both(
    consortium: Consortium, published: Published, job_id: str, tmp_path: Path
) -> None:
    attestation = export_with(consortium, job_id, published.checkpoint, tmp_path / "att.json")
    (carried,) = statement_of(json.loads(attestation.read_text()))["predicate"]["log"][
        "checkpoints"
    ]
    status, output = verify_with(attestation, consortium, published.checkpoint)
    standalone, standalone_output = run_standalone_with(
        attestation, consortium, published.checkpoint
    )

    # Same size: the head is the checkpoint (no proof); a later head needs a proof.
    assert bool(carried["consistency_proof"]) == (job_id == PRETRAIN_JOB)
    assert status == 0, output
    assert (
        f"consistent with the published checkpoint at tree size {published.size} (cosigned by "
        f"{', '.join(INSTITUTIONS)})" in output
    )
    assert standalone == 0, standalone_output
    assert f"consistent with checkpoints at tree sizes {published.size}" in standalone_output


def test_an_attestation_verifies_against_a_checkpoint_later_than_its_head(
    consortium: Consortium, published: Published, tmp_path: Path
) -> None:
    attestation = export_with(consortium, JOB, published.later, tmp_path / "att.json")

    status, output = verify_with(attestation, consortium, published.later)
    standalone, standalone_output = run_standalone_with(attestation, consortium, published.later)

    assert status == 0, output
    assert f"checkpoint at tree size {published.later_size} (cosigned by no site)" in output
    assert standalone == 0, standalone_output


def test_a_checkpoint_the_attestation_proves_nothing_about_is_refused_with_what_to_do(
    consortium: Consortium, published: Published
) -> None:
    """The pretraining attestation was exported without the checkpoint and proves into
    a later head: nothing ties the two, so both verifiers refuse rather than pass."""
    status, output = verify_with(consortium.pretrain, consortium, published.checkpoint)
    standalone, standalone_output = run_standalone_with(
        consortium.pretrain, consortium, published.checkpoint
    )

    assert status == ExitCode.PROVENANCE_INVALID, output
    assert "carries no consistency proof to the checkpoint (tree size" in output
    assert "export it again with --checkpoint" in output
    assert standalone == 1
    assert standalone_output.startswith("FAILED checkpoint file 1: the attestation proves no")


def test_a_forked_checkpoint_is_refused_by_both_verifiers_and_by_export(
    consortium: Consortium, published: Published, tmp_path: Path
) -> None:
    """The operator signs a checkpoint of another history at the attested size (a split
    view: one history for the sites, another for this reviewer)."""
    status, output = verify_with(consortium.federated, consortium, published.fork)
    standalone, standalone_output = run_standalone_with(
        consortium.federated, consortium, published.fork
    )
    exported = run_cli(
        "coordinator",
        "provenance",
        "export",
        JOB,
        "--data-dir",
        str(consortium.data_dir),
        "--checkpoint",
        str(published.fork),
        "-o",
        str(tmp_path / "att.json"),
    )

    assert status == ExitCode.PROVENANCE_INVALID, output
    assert "has shown two different histories (a fork)" in output
    assert standalone == 1 and standalone_output.startswith("FAILED checkpoint file 1"), (
        standalone_output
    )
    assert exported.returncode == ExitCode.CONFLICT, exported.stdout + exported.stderr
    assert "publishes another history" in " ".join(exported.stderr.split())
    assert not (tmp_path / "att.json").exists()


def carried_proof_node_changed(statement: dict[str, Any]) -> None:
    proof = statement["predicate"]["log"]["checkpoints"][0]["consistency_proof"]
    proof[0] = digest("not a node of the tree")


def carried_checkpoint_root_changed(statement: dict[str, Any]) -> None:
    carried = statement["predicate"]["log"]["checkpoints"][0]
    body, _, signatures = carried["checkpoint"].partition("\n\n")
    origin, size, _root = body.split("\n")
    root = b64(bytes.fromhex(digest("another root")))
    carried["checkpoint"] = f"{origin}\n{size}\n{root}\n\n{signatures}"


@pytest.mark.parametrize(
    ("tamper", "project_says"),
    [
        (carried_proof_node_changed, "is not consistent with the tree head"),
        (carried_checkpoint_root_changed, "the coordinator's"),
    ],
    ids=["proof_node_changed", "checkpoint_root_changed"],
)
def test_a_tampered_carried_checkpoint_is_refused_by_both_verifiers(
    consortium: Consortium,
    published: Published,
    tamper: Callable[[dict[str, Any]], None],
    project_says: str,
    tmp_path: Path,
) -> None:
    honest = export_with(consortium, PRETRAIN_JOB, published.checkpoint, tmp_path / "att.json")
    statement = statement_of(json.loads(honest.read_text()))
    tamper(statement)
    document = signed(statement, consortium.coordinator)

    with pytest.raises(AttestationError) as refused:
        verify_attestation(document, consortium.ca_cert)
    status, output = run_standalone(document, consortium.ca, tmp_path)

    assert project_says in str(refused.value)
    assert str(refused.value).startswith("log.checkpoints[0]")
    assert status == 1 and output.startswith("FAILED checkpoint 0:"), output


def test_a_key_replaced_before_the_head_cannot_cosign_it(tmp_path: Path) -> None:
    """The operator replaced an institution's key (say, it leaked); a cosignature of a
    later head by the old key is refused by both verifiers (the coordinator would not
    log it: this one is written by hand, as a coordinator that lies would)."""
    data_dir = tmp_path / "coordinator"
    files = init_consortium(data_dir, ["127.0.0.1"], cert_days=CERT_DAYS)
    keys = write_federated_job(data_dir, tmp_path / "sites")
    name, new = INSTITUTIONS[0], SigningKey.generate()
    recorder = JobRecorder(DataDir(data_dir), JOB)
    recorder.log.append_record(
        InstitutionKeyChanged(
            institution=name,
            key_id=new.key_id,
            public_key=b64(new.public.raw),
            replaced_key_ids=[keys[name].key_id],
            reason="the key leaked",
        )
    )
    recorder.publish_tree_head()
    head = LogView.read(recorder.log.path).head_lines[-1]
    assert head is not None
    coordinator = SigningKey.load(DataDir(data_dir).signing_key).public
    stale = witness_head(tmp_path / "old-key", name, keys[name], coordinator, head.decode(), {})
    assert recorder.cosignatures([stale]) == 1
    document = attest(data_dir, JOB)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())

    with pytest.raises(AttestationError, match="which the operator replaced before it"):
        verify_attestation(document, ca)
    status, output = run_standalone(document, files.ca_cert, tmp_path)
    assert status != 0
    assert f"cosignature of {name!r}: its key is not one bound to the institution" in output
