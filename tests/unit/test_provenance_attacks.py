"""Attacks on the provenance log, each performed and shown to fail `verify_log`.

The attacker is a file editor (no keys: edits, deletes, duplicates or moves lines) or
the operator (it also holds the coordinator's signing key, so it can sign whatever it
writes, but holds no site's key). Every log is written with the real `ProvenanceLog`
and typed records; an attack then edits lines as the attacker would, and the test
asserts the line `verify_log` stops at and a reason naming the problem.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from consortium import pki
from consortium.provenance.binding import sign_binding
from consortium.provenance.canonical import canonical_json
from consortium.provenance.checkpoint import checkpoint_body, cosign, origin_of
from consortium.provenance.log import (
    LEGACY_HEAD_FIELDS,
    ProvenanceLog,
    TreeHead,
    WitnessCosignature,
)
from consortium.provenance.merkle import leaf_hash, root_from_leaves
from consortium.provenance.records import (
    InstitutionKey,
    InstitutionKeyChanged,
    JobCompleted,
    JobResumed,
    JobStarted,
    KeyBinding,
    KnownRecord,
    OuterStep,
    Round,
    UpdateEntry,
    WorkerEntry,
)
from consortium.provenance.signing import SigningKey, b64, unb64
from consortium.provenance.updates import UpdateStatement
from consortium.provenance.verify import LogVerificationError, VerifyReport, verify_log
from tests.provenance_keys import ScratchCa
from tests.unit.provenance_lines import legacy_head_line

JOB = "job-attacked"
COMMITMENT = hashlib.sha256(b"data commitment").hexdigest()
NONCE = "0f" * 16
COSIGNED_AT = 1_700_000_000

# Line numbers (1-based) of the log the `honest` fixture writes.
JOB_STARTED, KEY_A, KEY_B = 1, 2, 3
HEAD_0, ROUND_1, HEAD_1, ROUND_2, HEAD_2, JOB_COMPLETED, HEAD_3 = range(4, 11)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def model(n: int) -> str:
    """The model digest round `n` ends with (0: the initial model)."""
    return digest(f"model after round {n}")


def started() -> JobStarted:
    return JobStarted(job_id=JOB, kind="federated", seed=7, initial_model_digest=model(0))


def fl_round(n: int, updates: list[UpdateEntry] | None = None, **fields: Any) -> Round:
    """Round `n`, from the model round n-1 ended with to `model(n)`."""
    values: dict[str, Any] = {
        "job_id": JOB,
        "round": n,
        "global_digest": model(n - 1),
        "participants": sorted(u.institution for u in updates or []),
        "updates": updates or [],
        "aggregate_digest": model(n),
        **fields,
    }
    return Round.model_validate(values)


def completed(rounds: int, final: str | None = None) -> JobCompleted:
    return JobCompleted(job_id=JOB, rounds=rounds, final_model_digest=final or model(rounds))


def pretrain_started() -> JobStarted:
    return JobStarted(job_id=JOB, kind="pretrain", seed=7, spec_digest=digest("spec"))


def outer_step(step: int) -> OuterStep:
    worker = WorkerEntry(
        worker="w0",
        institution="uni-a",
        node_id="11",
        device="cuda:0",
        position=0,
        shard_ids=[0, 1],
        seed=step,
        pseudo_gradient_digest=digest(f"gradient {step}"),
        inner_steps=50,
    )
    return OuterStep(
        job_id=JOB,
        round=step + 1,
        step=step,
        workers=[worker],
        step_seed=step,
        aggregate_digest=digest(f"aggregate {step}"),
        model_digest=model(step + 1),
    )


def edited(line: bytes, **changes: Any) -> bytes:
    """A log line with fields changed, written back in canonical form (as verify wants)."""
    return canonical_json({**json.loads(line), **changes})


def flipped(signature: str) -> str:
    """Another well-formed base64 signature of the same length."""
    raw = unb64(signature)
    return b64(bytes([raw[0] ^ 0x01]) + raw[1:])


@dataclass
class Consortium:
    """A coordinator's log, the sites' update-signing keys and the CA that bound them."""

    path: Path
    coordinator: SigningKey
    keys: dict[str, SigningKey]
    ca: ScratchCa
    heads: list[TreeHead] = field(default_factory=list)

    def writer(self) -> ProvenanceLog:
        return ProvenanceLog(self.path, self.coordinator)

    def append(self, *records: KnownRecord) -> None:
        writer = self.writer()
        for record in records:
            writer.append_record(record)

    def publish(self) -> TreeHead:
        head = self.writer().publish_tree_head()
        self.heads.append(head)
        return head

    def history(self, *records: KnownRecord) -> None:
        """The records, then one tree head: record i is on line i + 1."""
        self.append(*records)
        self.publish()

    def lines(self) -> list[bytes]:
        return self.path.read_bytes().splitlines()

    def write(self, lines: list[bytes]) -> None:
        self.path.write_bytes(b"".join(line + b"\n" for line in lines))

    def verify(self, **options: Any) -> VerifyReport:
        return verify_log(self.path, self.coordinator.public, **options)

    def failure(self, **options: Any) -> LogVerificationError:
        with pytest.raises(LogVerificationError) as info:
            self.verify(**options)
        return info.value

    def bound(self, institution: str, key: SigningKey | None = None) -> InstitutionKey:
        """The `institution_key` record onboarding writes: bound by the site's TLS key."""
        return self.ca.bound_key(institution, key or self.keys[institution])

    def update(self, institution: str, n: int, signer: SigningKey | None = None) -> UpdateEntry:
        """An accepted update of round `n`, signed (by `signer`, else the institution's
        key) over the statement naming `institution`."""
        key = signer or self.keys[institution]
        update_digest = digest(f"update of {institution} in round {n}")
        statement = UpdateStatement(
            job_id=JOB,
            round=n,
            global_digest=model(n - 1),
            update_digest=update_digest,
            num_examples=40,
            commitment=COMMITMENT,
            nonce=NONCE,
            institution=institution,
        )
        return UpdateEntry(
            institution=institution,
            node_id="11",
            accepted=True,
            key_id=key.key_id,
            update_digest=update_digest,
            num_examples=40,
            commitment=COMMITMENT,
            nonce=NONCE,
            signature=b64(key.sign(statement.to_bytes())),
        )

    def cosignature(
        self, institution: str, head: TreeHead, signer: SigningKey | None = None
    ) -> WitnessCosignature:
        """A site's cosignature/v1 of `head`, as `witness_head` makes it."""
        key = signer or self.keys[institution]
        body = checkpoint_body(origin_of(self.coordinator.key_id), head.tree_size, head.root_hash)
        return WitnessCosignature(
            tree_size=head.tree_size,
            root_hash=head.root_hash,
            institution=institution,
            key_id=key.key_id,
            timestamp_s=COSIGNED_AT,
            signature=b64(cosign(key, body, COSIGNED_AT)),
        )


@pytest.fixture
def consortium(tmp_path: Path) -> Consortium:
    keys = {name: SigningKey.generate() for name in ("uni-a", "uni-b")}
    return Consortium(tmp_path / "provenance.log", SigningKey.generate(), keys, ScratchCa.create())


@pytest.fixture
def honest(consortium: Consortium) -> Consortium:
    """A two-round job as the coordinator writes it, a tree head after every round."""
    c = consortium
    c.history(started(), c.bound("uni-a"), c.bound("uni-b"))
    c.history(fl_round(1, [c.update("uni-a", 1), c.update("uni-b", 1)]))
    c.history(fl_round(2, [c.update("uni-a", 2)]))
    c.history(completed(2))
    return c


def test_the_honest_log_verifies(honest: Consortium) -> None:
    report = honest.verify()

    assert (report.records, report.tree_heads, report.signed_updates) == (6, 4, 3)
    assert report.heads == honest.heads
    assert [h.tree_size for h in honest.heads] == [3, 4, 5, 6]
    assert [json.loads(line)["kind"] for line in honest.lines()][HEAD_0 - 1 :: 2] == [
        "tree_head"
    ] * 4


# --- tree heads: deleted, duplicated, edited, moved ------------------------------------


def test_deleting_an_intermediate_tree_head_breaks_the_chain(honest: Consortium) -> None:
    lines = honest.lines()
    del lines[HEAD_1 - 1]
    honest.write(lines)

    error = honest.failure()

    assert error.line == HEAD_2 - 1  # head 2, one line up
    assert "tree head number 2 where 1 was expected" in error.reason


def test_duplicating_a_tree_head_breaks_the_chain(honest: Consortium) -> None:
    """The copy covers the same records with the same root: only the chain tells."""
    lines = honest.lines()
    lines.insert(HEAD_1, lines[HEAD_1 - 1])
    honest.write(lines)

    error = honest.failure()

    assert error.line == HEAD_1 + 1
    assert "tree head number 1 where 2 was expected" in error.reason


def test_adding_a_field_to_a_tree_head_breaks_its_signature(honest: Consortium) -> None:
    lines = honest.lines()
    lines[HEAD_1 - 1] = edited(lines[HEAD_1 - 1], note="audited")
    honest.write(lines)

    error = honest.failure()

    assert error.line == HEAD_1
    assert "bad signature" in error.reason


def test_editing_the_time_of_a_tree_head_breaks_its_signature(honest: Consortium) -> None:
    lines = honest.lines()
    timestamp = json.loads(lines[HEAD_1 - 1])["timestamp_ms"]
    lines[HEAD_1 - 1] = edited(lines[HEAD_1 - 1], timestamp_ms=timestamp - 3_600_000)
    honest.write(lines)

    error = honest.failure()

    assert error.line == HEAD_1
    assert "bad signature" in error.reason


def test_resigning_an_edited_tree_head_breaks_the_next_heads_link(honest: Consortium) -> None:
    """The operator holds the coordinator key and re-signs the edited head; the head
    after it still names the original line."""
    lines = honest.lines()
    entry = json.loads(lines[HEAD_1 - 1])
    entry["timestamp_ms"] -= 3_600_000
    del entry["signature"]
    entry["signature"] = b64(honest.coordinator.sign(canonical_json(entry)))
    lines[HEAD_1 - 1] = canonical_json(entry)
    honest.write(lines)

    error = honest.failure()

    assert error.line == HEAD_2
    assert "does not name the head before it" in error.reason


def test_swapping_two_tree_heads_of_the_same_tree_breaks_the_chain(honest: Consortium) -> None:
    """Two heads over the same records (a second head published with nothing new): moved
    past each other, each still covers the log before it; only the chain tells."""
    honest.publish()
    lines = honest.lines()
    lines[HEAD_3 - 1], lines[HEAD_3] = lines[HEAD_3], lines[HEAD_3 - 1]
    honest.write(lines)

    error = honest.failure()

    assert error.line == HEAD_3
    assert "tree head number 4 where 3 was expected" in error.reason


def test_moving_a_tree_head_past_a_record_fails(honest: Consortium) -> None:
    lines = honest.lines()
    lines[HEAD_1 - 1], lines[ROUND_2 - 1] = lines[ROUND_2 - 1], lines[HEAD_1 - 1]
    honest.write(lines)

    error = honest.failure()

    assert error.line == ROUND_2
    assert "tree head covers 4 records, log has 5" in error.reason


def append_legacy_head(c: Consortium) -> None:
    """A tree head as written before heads were chained, over every record so far."""
    records = [line for line in c.lines() if json.loads(line)["kind"] == "record"]
    root = root_from_leaves([leaf_hash(line) for line in records]).hex()
    line = legacy_head_line(c.coordinator, len(records), root, 1_600_000_000_000 + len(records))
    with c.path.open("ab") as handle:
        handle.write(line + b"\n")


def test_a_log_of_legacy_heads_verifies_and_chained_heads_may_follow(
    consortium: Consortium,
) -> None:
    c = consortium
    c.append(started(), c.bound("uni-a"))
    append_legacy_head(c)
    c.append(fl_round(1, [c.update("uni-a", 1)]))
    append_legacy_head(c)

    report = c.verify()

    assert (report.records, report.tree_heads, report.signed_updates) == (3, 2, 1)
    assert set(json.loads(c.lines()[-1])) == LEGACY_HEAD_FIELDS
    c.history(completed(1))  # an upgraded coordinator chains from the legacy heads
    assert json.loads(c.lines()[-1])["head_index"] == 2
    assert c.verify().tree_heads == 3


def test_a_legacy_head_after_a_chained_one_fails(consortium: Consortium) -> None:
    """A chain-less head after the chain started would let heads be dropped unnoticed."""
    c = consortium
    c.history(started())
    c.append(fl_round(1))
    append_legacy_head(c)

    error = c.failure()

    assert error.line == 4
    assert "an unchained tree head after chained ones" in error.reason


# --- a forged history after truncation ----------------------------------------------------


def forge_after_round_1(c: Consortium) -> list[bytes]:
    """The operator truncates the log after round 1's head and writes a round 2 of its
    own: the sites' signed updates reused, the aggregate its own, all signed with the
    coordinator key it holds. Returns the original lines."""
    original = c.lines()
    c.write(original[:HEAD_1])
    genuine = json.loads(original[ROUND_2 - 1])["body"]
    c.append(Round.model_validate({**genuine, "aggregate_digest": digest("backdoored")}))
    c.writer().publish_tree_head()
    return original


def test_forged_history_after_truncation_passes_alone_but_not_against_published_head(
    honest: Consortium,
) -> None:
    forge_after_round_1(honest)
    honest.append(completed(2, final=digest("backdoored")))
    honest.writer().publish_tree_head()

    report = honest.verify()  # consistent, and signed with the coordinator's key

    assert (report.records, report.tree_heads, report.signed_updates) == (6, 4, 3)
    assert report.last_head is not None
    assert report.last_head.tree_size == honest.heads[-1].tree_size
    assert report.last_head.root_hash != honest.heads[-1].root_hash
    # A head published before the rewritten round is still a prefix of the forgery ...
    assert honest.verify(expected_head=honest.heads[1]).records == 6
    # ... one published after it is not.
    error = honest.failure(expected_head=honest.heads[2])
    assert error.line == len(honest.lines())
    assert "does not match the expected tree head of size 5" in error.reason


def test_forged_history_keeping_a_cosignature_of_the_original_head_fails(
    honest: Consortium,
) -> None:
    lines = honest.lines()
    cosigned = honest.cosignature("uni-a", honest.heads[2])
    assert honest.writer().append_cosignatures([cosigned]) == 1
    lines.insert(HEAD_2, canonical_json(cosigned.line()))  # where a site's reply lands
    honest.write(lines)
    assert honest.verify().witnesses == {5: {"uni-a"}}

    original = forge_after_round_1(honest)
    # The writer would not record it against the forged head; the operator keeps the line.
    assert honest.writer().append_cosignatures([cosigned]) == 0
    honest.write([*honest.lines(), original[HEAD_2]])

    error = honest.failure()

    assert error.line == HEAD_2 + 1
    assert "'uni-a' cosigns a head of size 5 that the log does not hold" in error.reason


# --- institution keys -------------------------------------------------------------------


def test_update_of_one_institution_signed_with_anothers_bound_key_fails(
    consortium: Consortium,
) -> None:
    c = consortium
    c.history(
        started(),
        c.bound("uni-a"),
        c.bound("uni-b"),
        fl_round(1, [c.update("uni-b", 1, signer=c.keys["uni-a"])]),
    )

    error = c.failure()

    assert error.line == 4
    assert "update of 'uni-b' is signed by key" in error.reason
    assert "bound to 'uni-a'" in error.reason


def test_update_signed_by_an_unbound_key_fails_unless_allowed(consortium: Consortium) -> None:
    """The operator logs a key of its own for uni-a, without uni-a's binding."""
    c = consortium
    operator_key = SigningKey.generate()
    unbound = InstitutionKey(
        institution="uni-a",
        key_id=operator_key.key_id,
        public_key=b64(operator_key.public.raw),
    )
    c.history(
        started(),
        c.bound("uni-a"),
        unbound,
        fl_round(1, [c.update("uni-a", 1, signer=operator_key)]),
    )

    error = c.failure()

    assert error.line == 4
    assert "which no binding of the institution's own vouches for" in error.reason
    report = c.verify(allow_unbound_keys=True)
    assert report.signed_updates == 1
    assert report.keyring.sources() == {"uni-a": {"bound", "unbound"}}


def test_giving_one_institutions_key_to_another_fails(consortium: Consortium) -> None:
    c = consortium
    c.history(started(), c.bound("uni-a"), c.bound("uni-b", key=c.keys["uni-a"]))

    error = c.failure()

    assert error.line == 3
    assert "of 'uni-a' is also given to 'uni-b'" in error.reason


@pytest.fixture
def replaced(consortium: Consortium) -> tuple[Consortium, SigningKey, SigningKey]:
    """uni-a's bound key, then the operator's replacement of it: (log, old, new)."""
    c = consortium
    old, new = c.keys["uni-a"], SigningKey.generate()
    change = InstitutionKeyChanged(
        institution="uni-a",
        key_id=new.key_id,
        public_key=b64(new.public.raw),
        replaced_key_ids=[old.key_id],
        reason="the site's key was lost",
    )
    c.append(started(), c.bound("uni-a"), change)
    return c, old, new


def test_update_signed_with_a_replaced_key_fails(
    replaced: tuple[Consortium, SigningKey, SigningKey],
) -> None:
    c, old, _ = replaced
    c.history(fl_round(1, [c.update("uni-a", 1, signer=old)]))

    error = c.failure()

    assert error.line == 4
    assert "which the operator replaced before it" in error.reason


def test_update_signed_with_the_replacing_key_passes(
    replaced: tuple[Consortium, SigningKey, SigningKey],
) -> None:
    c, _, new = replaced
    c.history(fl_round(1, [c.update("uni-a", 1, signer=new)]))

    report = c.verify()

    assert report.signed_updates == 1
    assert report.keyring.sources() == {"uni-a": {"bound", "operator"}}


def test_key_change_replacing_another_institutions_key_fails(consortium: Consortium) -> None:
    """The operator cannot retire uni-b's key under a key change of uni-a."""
    c = consortium
    new = SigningKey.generate()
    change = InstitutionKeyChanged(
        institution="uni-a",
        key_id=new.key_id,
        public_key=b64(new.public.raw),
        replaced_key_ids=[c.keys["uni-b"].key_id],
        reason="routine",
    )
    c.history(started(), c.bound("uni-a"), c.bound("uni-b"), change)

    error = c.failure()

    assert error.line == 4
    assert "which is not one of its keys" in error.reason


def test_binding_signed_by_another_tls_key_fails(consortium: Consortium) -> None:
    """uni-a's certificate, but a binding signature the operator made with a TLS key of
    its own."""
    c = consortium
    genuine = c.bound("uni-a")
    assert genuine.binding is not None
    forged = sign_binding(pki.generate_key(), "uni-a", c.keys["uni-a"].public)
    record = InstitutionKey(
        institution="uni-a",
        key_id=genuine.key_id,
        public_key=genuine.public_key,
        binding=KeyBinding(certificate=genuine.binding.certificate, signature=b64(forged)),
    )
    c.history(started(), record)

    error = c.failure()

    assert error.line == 2
    assert "the key binding of 'uni-a': the binding signature does not verify" in error.reason


def test_binding_certificate_from_another_ca_fails_against_the_consortium_ca(
    consortium: Consortium,
) -> None:
    """The operator issues uni-a a second certificate from a CA of its own and binds
    its own key with it: self-consistent, so only the CA check tells."""
    c = consortium
    operator_key, rogue_ca = SigningKey.generate(), ScratchCa.create()
    c.history(
        started(),
        rogue_ca.bound_key("uni-a", operator_key),
        fl_round(1, [c.update("uni-a", 1, signer=operator_key)]),
    )

    assert c.verify().signed_updates == 1  # without the CA, the binding holds
    assert c.verify(ca=rogue_ca.cert).signed_updates == 1
    error = c.failure(ca=c.ca.cert)
    assert error.line == 2
    assert "was not issued by the CA it is checked against" in error.reason


# --- one job's history --------------------------------------------------------------------


def test_coherent_histories_verify(consortium: Consortium) -> None:
    """What the attacks below break: a resumed federated job and a pretraining job."""
    c = consortium
    c.history(
        started(),
        fl_round(1),
        fl_round(2),
        JobResumed(job_id=JOB, after_round=2, model_digest=model(2)),
        fl_round(3),
        completed(3),
    )
    assert c.verify().rounds_of(JOB) == 3

    c.path.unlink()
    c.history(pretrain_started(), outer_step(0), outer_step(1), completed(2))
    assert c.verify().rounds_of(JOB) == 2


SEMANTIC_ATTACKS = [
    pytest.param(
        lambda: [started(), fl_round(1), fl_round(1)],
        3,
        f"round 1 of job {JOB} is logged again",
        id="round-logged-twice",
    ),
    pytest.param(
        lambda: [started(), fl_round(1), fl_round(3, global_digest=model(1))],
        3,
        "rounds 2..2 are missing",
        id="round-skipped",
    ),
    pytest.param(
        lambda: [started(), fl_round(1), started()],
        3,
        f"job {JOB} has a second job_started",
        id="second-job-started",
    ),
    pytest.param(
        lambda: [started(), fl_round(1), completed(1), fl_round(2)],
        4,
        f"a record of job {JOB} after its job_completed",
        id="record-after-job-completed",
    ),
    pytest.param(
        lambda: [started(), fl_round(1), fl_round(2, global_digest=digest("substituted"))],
        3,
        "round 2's global model is",
        id="global-model-not-previous-aggregate",
    ),
    pytest.param(
        lambda: [
            started(),
            fl_round(1),
            fl_round(2),
            JobResumed(job_id=JOB, after_round=1, model_digest=model(1)),
        ],
        4,
        "resumes after round 1, but its last logged round is 2",
        id="resumed-after-wrong-round",
    ),
    pytest.param(
        lambda: [started(), fl_round(1), fl_round(2), completed(3, final=model(2))],
        4,
        "completed after 3 rounds, but 2 are logged",
        id="completed-with-wrong-round-count",
    ),
    pytest.param(
        lambda: [pretrain_started(), outer_step(0), outer_step(0)],
        3,
        f"outer step 0 of job {JOB} is logged again",
        id="outer-step-logged-twice",
    ),
]


@pytest.mark.parametrize(("records", "line", "reason"), SEMANTIC_ATTACKS)
def test_incoherent_job_history_fails(
    consortium: Consortium,
    records: Callable[[], list[KnownRecord]],
    line: int,
    reason: str,
) -> None:
    """Every record is signed by the coordinator; the history they tell is impossible."""
    consortium.history(*records())

    error = consortium.failure()

    assert error.line == line
    assert reason in error.reason


# --- witness cosignatures ---------------------------------------------------------------


def test_cosignatures_verify_and_name_their_witnesses(honest: Consortium) -> None:
    head = honest.heads[1]
    written = honest.writer().append_cosignatures(
        [honest.cosignature("uni-a", head), honest.cosignature("uni-b", head)]
    )

    report = honest.verify()

    assert written == 2
    assert report.witnesses == {head.tree_size: {"uni-a", "uni-b"}}
    assert report.witnesses_of(head) == ["uni-a", "uni-b"]


def _other_root(entry: dict[str, Any], honest: Consortium) -> dict[str, Any]:
    return {"root_hash": honest.heads[2].root_hash}


def _later_time(entry: dict[str, Any], honest: Consortium) -> dict[str, Any]:
    return {"timestamp_s": entry["timestamp_s"] + 60}


def _other_signature(entry: dict[str, Any], honest: Consortium) -> dict[str, Any]:
    return {"signature": flipped(entry["signature"])}


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        pytest.param(_other_root, "cosigns a head of size 4 that the log does not hold", id="root"),
        pytest.param(_later_time, "the cosignature of 'uni-a' does not verify", id="time"),
        pytest.param(_other_signature, "the cosignature of 'uni-a' does not verify", id="sig"),
    ],
)
def test_edited_cosignature_fails(
    honest: Consortium,
    edit: Callable[[dict[str, Any], Consortium], dict[str, Any]],
    reason: str,
) -> None:
    honest.writer().append_cosignatures([honest.cosignature("uni-a", honest.heads[1])])
    lines = honest.lines()
    lines[-1] = edited(lines[-1], **edit(json.loads(lines[-1]), honest))
    honest.write(lines)

    error = honest.failure()

    assert error.line == HEAD_3 + 1
    assert reason in error.reason


def test_cosignature_moved_before_the_head_it_cosigns_fails(honest: Consortium) -> None:
    honest.writer().append_cosignatures([honest.cosignature("uni-a", honest.heads[1])])
    lines = honest.lines()
    lines.insert(ROUND_1, lines.pop())
    honest.write(lines)

    error = honest.failure()

    assert error.line == ROUND_1 + 1
    assert "cosigns a head of size 4 that the log does not hold before this line" in error.reason


def test_cosignature_by_another_institutions_key_fails(honest: Consortium) -> None:
    """uni-a's cosignature made with uni-b's key: the writer records it (the head is in
    the log), the verifier refuses it."""
    forged = honest.cosignature("uni-a", honest.heads[1], signer=honest.keys["uni-b"])
    assert honest.writer().append_cosignatures([forged]) == 1

    error = honest.failure()

    assert error.line == HEAD_3 + 1
    assert "a cosignature of 'uni-a' is signed by key" in error.reason
    assert "bound to 'uni-b'" in error.reason


def test_cosignature_by_an_unlogged_key_fails(honest: Consortium) -> None:
    forged = honest.cosignature("uni-a", honest.heads[1], signer=SigningKey.generate())
    # The writer keeps it out (next test); whoever holds the file can still add it.
    with honest.path.open("ab") as log_file:
        log_file.write(canonical_json(forged.line()) + b"\n")

    error = honest.failure()

    assert error.line == HEAD_3 + 1
    assert "a cosignature of 'uni-a' names unknown key" in error.reason


def test_operator_set_keys_cannot_witness_a_forged_history(honest: Consortium) -> None:
    """The operator cuts the log, writes a history of its own, gives every institution a
    key of its own choosing by key changes (which the log shows, and which sign updates
    from then on) and writes those keys' cosignatures of its forged head: witnessing
    is a site's word against the operator's, so a key the operator set witnesses
    nothing, and verify refuses the line."""
    c = honest
    forge_after_round_1(c)
    chosen = {name: SigningKey.generate() for name in ("uni-a", "uni-b")}
    c.append(
        *(
            InstitutionKeyChanged(
                institution=name,
                key_id=key.key_id,
                public_key=b64(key.public.raw),
                replaced_key_ids=[c.keys[name].key_id],
                reason="keys rotated",
            )
            for name, key in chosen.items()
        )
    )
    forged_head = c.writer().publish_tree_head()
    # The writer keeps them out (it records cosignatures of sites' own keys only) ...
    forged = [c.cosignature(name, forged_head, signer=key) for name, key in chosen.items()]
    assert c.writer().append_cosignatures(forged) == 0
    with c.path.open("ab") as log_file:  # ... the operator, who owns the file, does not
        log_file.writelines(canonical_json(line.line()) + b"\n" for line in forged)

    error = c.failure()

    assert error.line == len(c.lines()) - 1
    assert "a cosignature of 'uni-a' is signed by key" in error.reason
    assert "which the operator set (institution_key_changed)" in error.reason
    c.write(c.lines()[:-2])  # without them, the forged head stands alone, unwitnessed
    assert c.verify().witnesses == {}


def test_append_cosignatures_skips_a_key_the_log_has_no_record_of(honest: Consortium) -> None:
    before = honest.path.read_bytes()
    unlogged = honest.cosignature("uni-a", honest.heads[1], signer=SigningKey.generate())

    assert honest.writer().append_cosignatures([unlogged]) == 0

    assert honest.path.read_bytes() == before
    honest.verify()  # still verifies: the cosignature was not written


def test_append_cosignatures_skips_a_head_the_log_does_not_hold(honest: Consortium) -> None:
    before = honest.path.read_bytes()
    last = honest.heads[-1]
    foreign = TreeHead(last.tree_size, digest("another log's root"), last.timestamp_ms)
    unwritten = TreeHead(last.tree_size + 1, last.root_hash, last.timestamp_ms)

    written = honest.writer().append_cosignatures(
        [honest.cosignature("uni-a", foreign), honest.cosignature("uni-b", unwritten)]
    )

    assert written == 0
    assert honest.path.read_bytes() == before
    assert honest.verify().witnesses == {}
