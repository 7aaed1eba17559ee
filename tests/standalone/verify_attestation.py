"""Check a Consortium model attestation with the standard library and `cryptography` only.

    python verify_attestation.py ATTESTATION.json CA.crt [CHECKPOINT ...]

prints one ``OK ...`` line and exits 0, or prints ``FAILED <check>: <why>`` and exits 1.

Why no project import: the attestation (`coordinator provenance export JOB`) claims to be
checkable by anyone who holds the consortium's CA certificate. A verifier that imports
the project's own code would prove only that the project agrees with itself; this one
is written from the documented formats alone, so a reviewer can read it in one sitting
and run it anywhere (the tests run it with ``python -I``, and check its imports).

What it checks, in order:

1. envelope: DSSE with payloadType ``application/vnd.in-toto+json``; payload and
   signatures in standard or URL-safe base64, padded or not;
2. statement: an in-toto Statement v1 of the consortium's predicate type, with one subject;
3. certificate: ``predicate.coordinator.certificate`` is issued directly by the CA, valid
   now, and certifies the Ed25519 key whose sha256 is ``predicate.coordinator.key_id``;
4. signature: a signature of the envelope (with that keyid, or none) verifies with that
   key over the DSSE pre-authentication encoding (PAE) of the payload;
5. log: ``predicate.log.origin`` names that key's log, and ``predicate.log.tree_head``
   is signed by that key (over the canonical JSON of every field but ``signature``);
6. entries: each line is canonical JSON, a record at its index, signed by that key (over
   canonical ``{"index", "type", "body"}``), and its RFC 9162 inclusion proof leads to
   the head's root;
7. subject: the job's ``job_completed`` entry names the subject's file name and sha256;
8. bindings: each ``institution_key`` entry's certificate is issued by the CA and names
   the institution, and its key signed (ECDSA-SHA256) the binding of the Ed25519 key;
9. cosignatures: each cosigns this head (C2SP cosignature/v1) with a bound key of its
   institution (a key only the operator vouched for, `institution_key_changed`, is not
   trusted here, and a key such a change replaced cosigns nothing: every carried change
   precedes the head);
10. checkpoints: each of ``predicate.log.checkpoints`` is a C2SP signed note by that key
    of that log, with an RFC 9162 consistency proof between it and the head; and each
    CHECKPOINT file given (a published checkpoint the reviewer holds) is the head or one
    of those, so the attestation's log is the one that was published.

Not checked here: the readable summary in the predicate (it is derived from the
entries, which are what is signed and proven), the institutions' signatures of their
updates, and whether the job's records tell a coherent history; the project's
`verify_attestation` checks those too.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://consortium.dev/provenance/job/v2"
BINDING_VERSION = "consortium-key-binding-v1"

Require = Callable[[bool, str], None]


class CheckFailedError(Exception):
    """One check failed; the message names it and says why."""


@contextmanager
def check(name: str) -> Iterator[Require]:
    """Yields `require(condition, why)`; that, or any error inside (a missing field, a
    signature that does not verify, bad base64 or hex), fails the check `name`."""

    def require(condition: bool, why: str) -> None:
        if not condition:
            raise CheckFailedError(f"{name}: {why}")

    try:
        yield require
    except InvalidSignature:
        raise CheckFailedError(f"{name}: the signature does not verify") from None
    except (KeyError, TypeError, ValueError, AttributeError, OSError) as err:
        raise CheckFailedError(f"{name}: {type(err).__name__}: {err}") from None


def canonical(value: Any) -> bytes:
    """The project's canonical JSON: sorted keys, no spaces, UTF-8, no NaN."""
    options: dict[str, Any] = {"sort_keys": True, "separators": (",", ":")}
    return json.dumps(value, ensure_ascii=False, allow_nan=False, **options).encode()


def b64(text: str, lenient: bool = False) -> bytes:
    """Base64; `lenient` (DSSE): URL-safe alphabet too, padding optional."""
    if lenient:
        text = text.strip().replace("-", "+").replace("_", "/")
        text += "=" * (-len(text) % 4)
    return base64.b64decode(text, validate=True)


def key_id_of(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)  # the issuer's name, and its signature
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def certified_key(coordinator: dict[str, Any], ca: x509.Certificate) -> Ed25519PublicKey:
    """The coordinator's Ed25519 key, certified directly by the CA."""
    with check("certificate") as require:
        cert = x509.load_pem_x509_certificate(coordinator["certificate"].encode())
        require(issued_by(cert, ca), "the CA did not issue it")
        now = dt.datetime.now(dt.UTC)
        require(cert.not_valid_before_utc <= now <= cert.not_valid_after_utc, "not valid now")
        key = cert.public_key()
        if not isinstance(key, Ed25519PublicKey):
            raise CheckFailedError("certificate: it certifies no Ed25519 key")
        try:
            usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        require(usage is not None and usage.digital_signature, "its key usage has no signing")
        require(key_id_of(key) == coordinator["key_id"], "it certifies another key")
    return key


def open_envelope(
    document: dict[str, Any], ca: x509.Certificate
) -> tuple[dict[str, Any], Ed25519PublicKey]:
    """The statement and the coordinator's certified key, once that key signed it."""
    with check("envelope") as require:
        require(document["payloadType"] == PAYLOAD_TYPE, "not an in-toto payload")
        payload = b64(document["payload"], lenient=True)
        statement: dict[str, Any] = json.loads(payload)
    with check("statement") as require:
        require(statement["_type"] == STATEMENT_TYPE, "not an in-toto Statement v1")
        require(statement["predicateType"] == PREDICATE_TYPE, "another predicate type")
        require(len(statement["subject"]) == 1, "not exactly one subject")
        coordinator = statement["predicate"]["coordinator"]
    key = certified_key(coordinator, ca)
    pae = b"DSSEv1 %d %s %d %s" % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode(), len(payload), payload)
    with check("signature") as require:
        tried = [s for s in document["signatures"] if s.get("keyid") in ("", None, key_id_of(key))]
        signed = any(verifies(key, b64(s["sig"], lenient=True), pae) for s in tried)
        require(signed, "no signature of the envelope verifies with the certified key")
    return statement, key


def verifies(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def verify_inclusion(leaf: bytes, index: int, size: int, proof: list[bytes], root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2, step by step."""
    if not 0 <= index < size or any(len(p) != 32 for p in proof):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False  # the proof is too long
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def checked_entries(log: dict[str, Any], key: Ed25519PublicKey) -> list[dict[str, Any]]:
    """The entries' records, each signed by `key` and included in the signed head's tree."""
    key_id = key_id_of(key)
    with check("tree head") as require:
        head = log["tree_head"]
        require(head["kind"] == "tree_head" and head["key_id"] == key_id, "not the key's head")
        unsigned = {name: value for name, value in head.items() if name != "signature"}
        key.verify(b64(head["signature"]), canonical(unsigned))
        size, root = int(head["tree_size"]), bytes.fromhex(head["root_hash"])
    records: list[dict[str, Any]] = []
    for entry in log["entries"]:
        with check(f"entry {entry.get('index')}") as require:
            line = entry["line"].encode()
            record = json.loads(line)
            require(canonical(record) == line, "the line is not canonical JSON")
            index = record["index"]
            in_order = not records or index > records[-1]["index"]
            require(record["kind"] == "record" and index == entry["index"], "not at its index")
            require(in_order, "not in log order")
            require(record["key_id"] == key_id, "not signed by the certified key")
            signed = {"index": index, "type": record["type"], "body": record["body"]}
            key.verify(b64(record["signature"]), canonical(signed))
            proof = [bytes.fromhex(node) for node in entry["inclusion_proof"]]
            leaf = hashlib.sha256(b"\x00" + line).digest()
            included = verify_inclusion(leaf, index, size, proof, root)
            require(included, "its inclusion proof does not lead to the head's root")
        records.append(record)
    return records


def check_subject(statement: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """The job's (last) job_completed names the subject's file name and sha256."""
    job_id = statement["predicate"]["job_id"]
    with check("job_completed") as require:
        completed = [
            r["body"]
            for r in records
            if r["type"] == "job_completed" and r["body"]["job_id"] == job_id
        ]
        require(bool(completed), f"the entries hold no job_completed of job {job_id}")
    with check("subject") as require:
        subject = statement["subject"][0]
        claimed = (subject["name"], subject["digest"]["sha256"])
        logged = (completed[-1]["model_file"], completed[-1]["model_file_sha256"])
        require(claimed == logged, f"the subject is {claimed}, the log names {logged}")


def bound_keys(
    records: list[dict[str, Any]], ca: x509.Certificate
) -> dict[tuple[str, str], Ed25519PublicKey]:
    """(institution, key id) -> key of each institution_key entry; its binding must hold."""
    keys = {}
    for body in (r["body"] for r in records if r["type"] == "institution_key"):
        with check(f"binding of {body.get('institution')!r}") as require:
            cert = x509.load_pem_x509_certificate(body["binding"]["certificate"].encode())
            require(issued_by(cert, ca), "the CA did not issue its certificate")
            names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            require([n.value for n in names] == [body["institution"]], "another institution")
            tls_key = cert.public_key()
            if not isinstance(tls_key, ec.EllipticCurvePublicKey):
                raise CheckFailedError(f"binding of {body['institution']!r}: not an EC key")
            fields = {name: body[name] for name in ("institution", "key_id", "public_key")}
            statement = canonical({"version": BINDING_VERSION, **fields})
            tls_key.verify(b64(body["binding"]["signature"]), statement, ec.ECDSA(hashes.SHA256()))
            key = Ed25519PublicKey.from_public_bytes(b64(body["public_key"]))
            require(key_id_of(key) == body["key_id"], "the key id is not the key's")
            keys[body["institution"], body["key_id"]] = key
    return keys


def replaced_keys(records: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(institution, key id) of each key an operator's key change replaced. Every carried
    entry precedes the attested head, so none of these keys may cosign it."""
    return {
        (r["body"]["institution"], key_id)
        for r in records
        if r["type"] == "institution_key_changed"
        for key_id in r["body"].get("replaced_key_ids", [])
    }


def witnesses(
    head: dict[str, Any],
    cosignatures: list[dict[str, Any]],
    keys: dict[tuple[str, str], Ed25519PublicKey],
) -> list[str]:
    """The institutions that cosigned `head` (C2SP cosignature/v1), each check passed."""
    root = base64.b64encode(bytes.fromhex(head["root_hash"])).decode()
    body = f"consortium/log/{head['key_id'][:32]}\n{head['tree_size']}\n{root}\n".encode()
    for line in cosignatures:
        name = f"cosignature of {line.get('institution')!r}"
        with check(name) as require:
            same = all(line[field] == head[field] for field in ("tree_size", "root_hash"))
            require(same, "it cosigns another head")
            key = keys.get((line["institution"], line["key_id"]))
            if key is None:
                raise CheckFailedError(f"{name}: its key is not one bound to the institution")
            message = b"cosignature/v1\ntime %d\n" % int(line["timestamp_s"]) + body
            key.verify(b64(line["signature"]), message)
    return sorted({line["institution"] for line in cosignatures})


def read_checkpoint(text: str, key: Ed25519PublicKey, origin: str) -> tuple[int, bytes]:
    """(tree size, root) of a C2SP checkpoint note signed by `key` (Ed25519, type 0x01)."""
    body, _, signatures = text.partition("\n\n")
    lines = body.split("\n")
    if len(lines) < 3 or lines[0] != origin:
        raise ValueError("not a checkpoint of this log")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_hash = hashlib.sha256(origin.encode() + b"\n\x01" + raw).digest()[:4]
    for line in signatures.splitlines():
        dash, name, value = line.split(" ")
        signature = b64(value)
        if dash == "\u2014" and name == origin and signature[:4] == key_hash:
            key.verify(signature[4:], (body + "\n").encode())
            return int(lines[1]), b64(lines[2])
    raise ValueError("no signature of the certified key")


def consistent(old: tuple[int, bytes], new: tuple[int, bytes], proof: list[bytes]) -> bool:
    """RFC 9162 section 2.1.4.2, step by step: the tree `old` prefixes the tree `new`."""
    (m, old_root), (n, new_root) = old, new
    if not 0 < m <= n or any(len(p) != 32 for p in proof):
        return False
    if m == n:
        return not proof and old_root == new_root
    if not proof:
        return False
    if m & (m - 1) == 0:
        proof = [old_root, *proof]
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = hashlib.sha256(b"\x01" + c + fr).digest()
            sr = hashlib.sha256(b"\x01" + c + sr).digest()
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = hashlib.sha256(b"\x01" + sr + c).digest()
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == old_root and sr == new_root


def checked_checkpoints(
    log: dict[str, Any], key: Ed25519PublicKey, held: tuple[str, ...]
) -> list[tuple[int, bytes]]:
    """The carried checkpoints, each consistent with the head; every held one among them."""
    head = log["tree_head"]
    proven = [(int(head["tree_size"]), bytes.fromhex(head["root_hash"]))]
    for position, entry in enumerate(log.get("checkpoints", [])):
        with check(f"checkpoint {position}") as require:
            carried = read_checkpoint(entry["checkpoint"], key, log["origin"])
            proof = [bytes.fromhex(node) for node in entry["consistency_proof"]]
            old, new = sorted((proven[0], carried))
            require(consistent(old, new, proof), "not consistent with the tree head")
            proven.append(carried)
    for number, text in enumerate(held, start=1):
        with check(f"checkpoint file {number}") as require:
            published = read_checkpoint(text, key, log["origin"])
            require(published in proven, "the attestation proves no consistency with it")
    return proven[1:]


def verify(document: dict[str, Any], ca: x509.Certificate, held: tuple[str, ...] = ()) -> str:
    """The OK line; raises CheckFailedError."""
    statement, key = open_envelope(document, ca)
    with check("log") as require:
        predicate, log = statement["predicate"], statement["predicate"]["log"]
        require(log["origin"] == f"consortium/log/{key_id_of(key)[:32]}", "another log")
    records = checked_entries(log, key)
    check_subject(statement, records)
    keys = bound_keys(records, ca)
    for replaced in replaced_keys(records):
        keys.pop(replaced, None)
    names = witnesses(log["tree_head"], log["cosignatures"], keys)
    sizes = [str(size) for size, _ in checked_checkpoints(log, key, held)]
    subject = statement["subject"][0]
    return (
        f"OK {subject['name']} (sha256 {subject['digest']['sha256']}) is the model of job "
        f"{predicate['job_id']}, in the log at tree size {log['tree_head']['tree_size']}, "
        f"cosigned by {', '.join(names) or 'no site'}"
        + (f"; consistent with checkpoints at tree sizes {', '.join(sizes)}" if sizes else "")
    )


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        usage = "usage: verify_attestation.py ATTESTATION.json CA.crt [CHECKPOINT ...]"
        print(usage, file=sys.stderr)
        return 2
    try:
        with check("input"):
            with open(argv[0], encoding="utf-8") as handle:
                document = json.load(handle)
            with open(argv[1], "rb") as handle:
                ca = x509.load_pem_x509_certificate(handle.read())
            held = []
            for path in argv[2:]:
                with open(path, encoding="utf-8") as handle:
                    held.append(handle.read())
        print(verify(document, ca, tuple(held)))
    except CheckFailedError as failure:
        print(f"FAILED {failure}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
