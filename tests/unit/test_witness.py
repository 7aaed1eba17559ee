"""Sites witness the coordinator's log: each cosigns a head only when it extends every
head it cosigned before, so a dishonest operator who truncates or rewrites the log is
caught by the sites themselves, and `client provenance check`, `coordinator provenance
verify --min-witnesses/--checkpoint` and `publish` work from what they cosigned.

The coordinator's side is the real `ProvenanceLog` and `LogView` (what a round sends);
the site's side is the real `witness_head` (what `signing_mod` calls per message).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from client.metrics import LogRefusalCollector
from consortium.exit_codes import ExitCode
from consortium.provenance.log import ProvenanceLog, WitnessCosignature, read_lines
from consortium.provenance.records import JobStarted, Round
from consortium.provenance.signing import SigningKey
from consortium.provenance.verify import verify_log
from consortium.provenance.witness import (
    BAD_HEAD,
    NO_PROOF,
    REFUSALS_FILE,
    REWRITTEN,
    TRUNCATED,
    LogInconsistentError,
    WitnessRecord,
    witness_dir,
    witness_head,
)
from coordinator.data_dir import DataDir
from coordinator.provenance.witnessing import LogView, WitnessedHead, check_cosignature
from tests.helpers import run_cli
from tests.provenance_keys import ScratchCa

JOB = "job-witnessed"
MODEL = "00" * 32
SITES = ("alpha", "beta", "gamma")


@dataclass
class Site:
    institution: str
    state_dir: Path
    key: SigningKey


@dataclass
class Consortium:
    """A coordinator data dir with a log, and three onboarded sites that witness it."""

    data_dir: DataDir
    key: SigningKey
    log: ProvenanceLog
    sites: dict[str, Site]
    rounds: int = 0
    cosigned: list[WitnessCosignature] = field(default_factory=list)

    def next_round(self, metrics: float = 0.5) -> None:
        self.rounds += 1
        record = Round(
            job_id=JOB,
            round=self.rounds,
            global_digest=MODEL,
            aggregate_digest="",  # nothing accepted: the next round starts from MODEL
            metrics={"accuracy": metrics},
        )
        self.log.append_record(record)
        self.log.publish_tree_head()

    def witness(self, name: str, record: bool = True) -> WitnessCosignature:
        """What one round's message does at site `name`; the coordinator then checks
        the cosignature and (unless it crashed first) logs it."""
        site = self.sites[name]
        request = LogView.read(self.log.path).request_for(name)
        assert request is not None
        cosignature = witness_head(
            site.state_dir, name, site.key, self.key.public, request.head_line, request.proofs
        )
        head = WitnessedHead(request.tree_size, request.root_hash, self.key.key_id)
        checked = check_cosignature(
            {
                "tree-size": cosignature.tree_size,
                "root-hash": cosignature.root_hash,
                "key-id": cosignature.key_id,
                "timestamp": cosignature.timestamp_s,
                "signature": cosignature.signature,
            },
            name,
            {site.key.key_id: site.key.public.raw},
            head,
        )
        if record:
            assert self.log.append_cosignatures([checked]) == 1
        return checked

    def all_witness(self) -> None:
        for name in SITES:
            self.witness(name)

    def truncate_after_head(self, head_number: int) -> None:
        """The operator cuts the log just after its `head_number`-th tree head (0-based)."""
        kept: list[bytes] = []
        heads = 0
        for line in read_lines(self.log.path):
            kept.append(line)
            if json.loads(line)["kind"] == "tree_head":
                if heads == head_number:
                    break
                heads += 1
        self.log.path.write_bytes(b"".join(line + b"\n" for line in kept))
        self.rounds = sum(1 for line in kept if json.loads(line).get("type") == "round")


@pytest.fixture
def consortium(tmp_path: Path) -> Consortium:
    data_dir = DataDir(tmp_path / "coordinator")
    key = SigningKey.load_or_create(data_dir.signing_key)
    log = ProvenanceLog(data_dir.provenance_log, key)
    ca = ScratchCa.create()
    sites = {}
    for name in SITES:
        site = Site(name, tmp_path / "sites" / name, SigningKey.generate())
        log.append_record(ca.bound_key(name, site.key))
        sites[name] = site
    log.append_record(JobStarted(job_id=JOB, kind="federated", initial_model_digest=MODEL))
    log.publish_tree_head()
    return Consortium(data_dir, key, log, sites)


def refusal(consortium: Consortium, name: str) -> LogInconsistentError:
    with pytest.raises(LogInconsistentError) as raised:
        consortium.witness(name)
    return raised.value


# --- an honest coordinator ------------------------------------------------------------


def test_every_head_is_cosigned_by_every_site_and_verify_names_the_witnesses(
    consortium: Consortium,
) -> None:
    for _ in range(3):
        consortium.all_witness()
        consortium.next_round()
    consortium.all_witness()  # the head over the last round, as a job's end asks

    report = verify_log(consortium.log.path, consortium.key.public)

    assert len(report.heads) == 4
    assert [report.witnesses_of(head) for head in report.heads] == [list(SITES)] * 4
    for name in SITES:
        cosigned = WitnessRecord(consortium.sites[name].state_dir).heads()
        assert [h.tree_size for h in cosigned] == [h.tree_size for h in report.heads]


def test_a_head_cosigned_again_is_recorded_once_at_the_site_and_in_the_log(
    consortium: Consortium,
) -> None:
    consortium.witness("alpha")
    again = consortium.witness("alpha", record=False)  # a round sent again: the same head

    assert len(WitnessRecord(consortium.sites["alpha"].state_dir).heads()) == 1
    assert consortium.log.append_cosignatures([again]) == 0  # the log keeps the first
    report = verify_log(consortium.log.path, consortium.key.public)
    assert report.witnesses_of(report.heads[-1]) == ["alpha"]


def test_a_late_message_with_a_head_the_site_cosigned_before_is_not_a_truncation(
    consortium: Consortium,
) -> None:
    """A stale run's message (an earlier round) carries an older head this site cosigned
    already: it is cosigned again, and the site's record does not go back."""
    site = consortium.sites["alpha"]
    early = LogView.read(consortium.log.path).request_for("alpha")
    assert early is not None
    consortium.witness("alpha")
    consortium.next_round()
    consortium.witness("alpha")

    again = witness_head(
        site.state_dir, "alpha", site.key, consortium.key.public, early.head_line, {}
    )

    assert again.tree_size == early.tree_size
    sizes = [h.tree_size for h in WitnessRecord(site.state_dir).heads()]
    assert sizes == sorted(sizes) and sizes[-1] > early.tree_size


def test_a_cosignature_lost_in_a_crash_is_still_proven_from(consortium: Consortium) -> None:
    """The site cosigned a head, but the coordinator died before logging it: the next
    request still carries a proof from that head, so the site goes on."""
    consortium.witness("alpha")
    consortium.next_round()
    consortium.witness("alpha", record=False)  # its reply never reached the log
    consortium.next_round()
    consortium.next_round()

    cosigned = consortium.witness("alpha")

    assert cosigned.tree_size == LogView.read(consortium.log.path).tree.size


# --- a dishonest operator, caught by the sites ------------------------------------------


def test_a_site_refuses_a_truncated_log(consortium: Consortium) -> None:
    consortium.all_witness()
    consortium.next_round()
    consortium.next_round()
    consortium.all_witness()  # cosigned the head after round 2
    consortium.truncate_after_head(1)  # back to the head after round 1

    error = refusal(consortium, "alpha")

    assert error.reason == TRUNCATED
    assert "truncated or rolled back" in error.detail


def test_a_site_refuses_a_log_forged_after_truncation(consortium: Consortium) -> None:
    """Cut after round 1, then append a forged round 2 signed with the coordinator's own
    key: `verify` alone cannot tell (the operator holds the key); the sites can."""
    consortium.all_witness()
    consortium.next_round()
    consortium.next_round(metrics=0.9)
    consortium.all_witness()  # the honest round 2
    consortium.truncate_after_head(1)
    consortium.next_round(metrics=0.1)  # forged round 2, same size, another root

    assert verify_log(consortium.log.path, consortium.key.public).records > 0
    same_size = refusal(consortium, "alpha")
    consortium.next_round()  # and a longer forged log: its proof cannot hold
    longer = refusal(consortium, "beta")

    assert same_size.reason == REWRITTEN and "was rewritten" in same_size.detail
    assert longer.reason == REWRITTEN and "does not extend" in longer.detail


def test_a_site_refuses_a_head_without_a_proof_from_its_last(consortium: Consortium) -> None:
    site = consortium.sites["alpha"]
    consortium.witness("alpha")
    consortium.next_round()
    request = LogView.read(consortium.log.path).request_for("alpha")
    assert request is not None and request.proofs  # the honest request proves it

    with pytest.raises(LogInconsistentError) as raised:
        witness_head(
            site.state_dir, "alpha", site.key, consortium.key.public, request.head_line, {}
        )

    assert raised.value.reason == NO_PROOF


def test_a_site_refuses_a_head_the_coordinator_did_not_sign(consortium: Consortium) -> None:
    site = consortium.sites["alpha"]
    request = LogView.read(consortium.log.path).request_for("alpha")
    assert request is not None
    impostor = SigningKey.generate()

    with pytest.raises(LogInconsistentError) as raised:
        witness_head(site.state_dir, "alpha", site.key, impostor.public, request.head_line, {})
    edited = request.head_line.replace('"timestamp_ms":', '"timestamp_ms":1', 1)
    with pytest.raises(LogInconsistentError) as tampered:
        witness_head(site.state_dir, "alpha", site.key, consortium.key.public, edited, {})

    assert raised.value.reason == BAD_HEAD and "not signed by the coordinator" in str(raised.value)
    assert tampered.value.reason == BAD_HEAD
    assert WitnessRecord(site.state_dir).heads() == []  # nothing cosigned


def test_refusals_are_counted_for_the_sites_metrics(consortium: Consortium) -> None:
    consortium.all_witness()
    consortium.next_round()
    consortium.next_round()
    consortium.all_witness()
    consortium.truncate_after_head(1)  # a head the sites never cosigned
    refusal(consortium, "alpha")
    refusal(consortium, "alpha")
    state_dir = consortium.sites["alpha"].state_dir

    collector = LogRefusalCollector("alpha", witness_dir(state_dir) / REFUSALS_FILE)
    (family,) = list(collector.collect())
    counts = {sample.labels["reason"]: sample.value for sample in family.samples}

    assert family.name == "consortium_site_log_refusals"
    assert counts[TRUNCATED] == 2 and counts[REWRITTEN] == 0


# --- the commands -----------------------------------------------------------------------


def copy_of_log(consortium: Consortium, path: Path) -> Path:
    path.write_bytes(consortium.log.path.read_bytes())
    return path


def test_client_provenance_check_reports_the_first_divergence(
    consortium: Consortium, tmp_path: Path
) -> None:
    consortium.all_witness()
    consortium.next_round()
    consortium.all_witness()
    consortium.next_round()
    consortium.all_witness()
    site = str(consortium.sites["alpha"].state_dir)
    honest = copy_of_log(consortium, tmp_path / "honest.jsonl")
    consortium.truncate_after_head(1)
    truncated = copy_of_log(consortium, tmp_path / "truncated.jsonl")
    consortium.next_round(metrics=0.1)  # forged round 2 after the cut
    rewritten = copy_of_log(consortium, tmp_path / "rewritten.jsonl")

    def check(log: Path) -> tuple[int, str]:
        done = run_cli("client", "provenance", "check", "--log", str(log), "--state-dir", site)
        return done.returncode, " ".join((done.stdout + done.stderr).split())

    ok, said_ok = check(honest)
    cut, said_cut = check(truncated)
    forged, said_forged = check(rewritten)

    assert ok == 0 and "extends all 3 heads this site cosigned" in said_ok
    assert cut == ExitCode.PROVENANCE_INVALID and "were removed" in said_cut
    assert forged == ExitCode.PROVENANCE_INVALID and "was rewritten between" in said_forged


def test_verify_min_witnesses_publish_and_checkpoint(
    consortium: Consortium, tmp_path: Path
) -> None:
    consortium.all_witness()
    consortium.next_round()
    consortium.all_witness()
    data_dir = str(consortium.data_dir.root)

    def coordinator(*argv: str) -> tuple[int, str]:
        done = run_cli("coordinator", "provenance", *argv, "--data-dir", data_dir)
        return done.returncode, " ".join((done.stdout + done.stderr).split())

    three = coordinator("verify", "--min-witnesses", "3", "--heads")
    four = coordinator("verify", "--min-witnesses", "4")
    half_head = coordinator("verify", "--tree-size", "3")
    published = coordinator("publish", str(tmp_path / "public"))
    checkpoint = tmp_path / "public" / "checkpoint"
    against = coordinator("verify", "--checkpoint", str(checkpoint))

    assert three[0] == 0 and "cosigned by alpha, beta, gamma" in three[1]
    # Taken from the data dir: said, with how to pass the key the reader holds instead
    # (a `.consortium` beside a log may be the sender's).
    assert "trusted: coordinator key" in three[1] and "pass --key with the key you hold" in three[1]
    assert four[0] == ExitCode.PROVENANCE_INVALID and "fewer than --min-witnesses 4" in four[1]
    assert half_head[0] != 0 and "--tree-size and --root-hash go together" in half_head[1]
    assert published[0] == 0 and "cosigned by alpha, beta, gamma" in published[1]
    note = checkpoint.read_text()
    assert note.splitlines()[0].startswith("consortium/log/") and note.count("\u2014 ") == 4
    assert against[0] == 0 and "the log extends checkpoint" in against[1]

    consortium.truncate_after_head(0)  # the operator cuts what the checkpoint published
    cut = coordinator("verify", "--checkpoint", str(checkpoint))
    checkpoint.write_text(note.replace("\u2014 beta ", "\u2014 beta A", 1))  # a bad cosignature
    forged = coordinator("verify", "--checkpoint", str(checkpoint))

    assert cut[0] == ExitCode.PROVENANCE_INVALID and "expected head covers" in cut[1]
    assert forged[0] == ExitCode.PROVENANCE_INVALID and "'beta'" in forged[1]
