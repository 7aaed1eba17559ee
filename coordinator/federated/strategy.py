"""The coordinator's Message-API strategy: Flower samples, we admit and aggregate.

Node sampling and message construction are delegated to Flower's FedAvg or
FedProx. Every reply then goes through `admission.admit` (signature, key,
nonce) and the shared aggregation core (`consortium.aggregation`), which
validates shapes, dtypes, finiteness and the norm bound and aggregates
deterministically: the same accepted updates give the same bits in any
arrival order. What happened to each reply is kept for the provenance log, against
the institution its node's SuperNode key was onboarded for, never the one the reply
names; an update signed for another institution than its node's is refused as
"impersonation" (`check_sender`), as in federated pretraining.

Three rules need the whole round and live here: an institution contributes at most
one update per round (the others are refused as "duplicate", whichever of its nodes
sent them); when the spec sets no `max_update_norm`, an update's norm is bounded by
`DEFAULT_NORM_RATIO` times the global model's; and a round counts only with at least
`min_accepted` (the spec's `min_clients`) accepted updates: an attempt with fewer is
sent again, up to `ROUND_ATTEMPTS` times, and then the job fails, naming each
institution whose update was refused and why (`TooFewUpdatesError`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from consortium.aggregation import (
    MAX_WEIGHT,
    RejectReason,
    StreamingMean,
    UpdateRejected,
    coordinate_median,
    krum,
    trimmed_mean,
    validate_update,
)
from consortium.aggregation.validate import tensor_stats
from consortium.errors import ConsortiumError
from consortium.exit_codes import ExitCode
from consortium.model_wire import pack_tensors
from consortium.provenance.witness import WITNESS_RECORD
from consortium.tensor_digest import arrays_digest
from coordinator.federated.admission import AdmissionState, AdmittedUpdate, UpdateRefused, admit
from coordinator.federated.reasons import DUPLICATE, IMPERSONATION, RETRIED
from coordinator.federated.retention import retain
from coordinator.provenance.witnessing import LogView, WitnessedHead, WitnessRequest

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[Any]]

# Without a `max_update_norm` in the spec, an update (the site's whole model) may have
# a global L2 norm of at most this many times the global model's. Relative, because a
# model's norm grows with its size. Measured honest ratios (docs/aggregation.md;
# tests/unit/test_update_admission.py): digits-cnn at lr 0.05 at most 1.5, bytelm at
# lr 0.001 1.02 and at lr 0.05 from scratch 6.4 (its first round, the largest seen).
DEFAULT_NORM_RATIO = 10.0
# The default bound of a global model whose norm is (near) zero.
MIN_DEFAULT_NORM = 1.0
# How often a round is sent when too few of its updates are accepted (a site restarting,
# or a site whose every update fails) before the job fails.
ROUND_ATTEMPTS = 3
DETAIL_CHARS = 300  # of a refusal's detail, in the job's failure message


class TooFewUpdatesError(ConsortiumError):
    """A round had fewer accepted updates than min_clients in every attempt: the job
    fails with this message (a watcher sees it end FAILED)."""

    exit_code = ExitCode.JOB_FAILED


@dataclass(frozen=True)
class AggregationRule:
    name: str = "mean"  # mean | trimmed-mean | median | krum
    trim_fraction: float = 0.1
    krum_byzantine: int = 0
    # None: DEFAULT_NORM_RATIO x the round's global model norm (`bounded`)
    max_update_norm: float | None = None

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "rule": self.name,
            "trim_fraction": self.trim_fraction,
            "krum_byzantine": self.krum_byzantine,
            "max_update_norm": self.max_update_norm,
        }
        if self.max_update_norm is None:
            described["default_norm_ratio"] = DEFAULT_NORM_RATIO
        return described

    def bounded(self, reference: Mapping[str, npt.NDArray[Any]]) -> AggregationRule:
        """This rule with the norm bound in force for a round whose global model is
        `reference`: the spec's, or the default derived from the model."""
        if self.max_update_norm is not None:
            return self
        return replace(self, max_update_norm=default_norm_bound(reference))


def model_norm(arrays: Mapping[str, npt.NDArray[Any]]) -> float:
    """Global L2 norm, summed as the aggregation core's validation sums it (exactly
    reproducible, so a replay derives the same bound)."""
    sums = (s for name in sorted(arrays) for s in tensor_stats(arrays[name]).superblock_sumsq)
    return math.sqrt(math.fsum(sums))


def default_norm_bound(reference: Mapping[str, npt.NDArray[Any]]) -> float:
    norm = model_norm(reference)
    if not math.isfinite(norm):
        raise ValueError("the global model has a non-finite value; no norm bound derives from it")
    return max(DEFAULT_NORM_RATIO * norm, MIN_DEFAULT_NORM)


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics that may go to state and the provenance log (canonical JSON has no
    NaN or infinity): a non-finite number is left out, with a warning, so that logging
    a round can never fail it."""
    kept: dict[str, Any] = {}
    for name, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            log.warning("metric %s is %s; it is not recorded", name, value)
            continue
        kept[name] = value
    return kept


def aggregate(
    rule: AggregationRule, reference: Arrays, updates: list[tuple[Arrays, int]]
) -> Arrays:
    """The aggregate of already admitted updates; raises UpdateRejected for a bad one
    (each was validated on admission, so this means a bug or a tampered retained file)."""
    arrays = [u for u, _ in updates]
    if rule.name == "trimmed-mean":
        return trimmed_mean(
            arrays, rule.trim_fraction, reference=reference, max_norm=rule.max_update_norm
        )
    if rule.name == "median":
        return coordinate_median(arrays, reference=reference, max_norm=rule.max_update_norm)
    if rule.name == "krum":
        return krum(arrays, rule.krum_byzantine, reference=reference, max_norm=rule.max_update_norm)
    mean = StreamingMean(reference, max_norm=rule.max_update_norm)
    rejected = mean.add_many(updates)
    if rejected:
        raise rejected[0][1]
    return mean.finish()


def check_update(
    rule: AggregationRule, reference: Arrays, update: Arrays, num_examples: int
) -> None:
    """Everything the aggregation would refuse, checked before it can stop a round."""
    if not 1 <= num_examples <= MAX_WEIGHT:
        raise UpdateRejected(
            RejectReason.WEIGHT, f"example count {num_examples} is outside 1..{MAX_WEIGHT}"
        )
    validate_update(update, reference, max_norm=rule.max_update_norm)


@dataclass
class RoundProvenance:
    round: int
    global_digest: str
    updates: list[dict[str, Any]] = field(default_factory=list)
    accepted: list[AdmittedUpdate] = field(default_factory=list)
    aggregate_digest: str = ""
    train_loss: float | None = None
    # The rule in force, its norm bound included (what the round record says).
    aggregation: dict[str, Any] = field(default_factory=dict)
    witnessed: WitnessedHead | None = None  # the log head the round asked sites to cosign

    @property
    def participants(self) -> list[str]:
        return sorted(u.institution for u in self.accepted)


class ConsortiumStrategy(Strategy):
    def __init__(
        self,
        sampler: Strategy,
        job_id: str,
        store: AdmissionState,
        rule: AggregationRule,
        round_offset: int,
        retention_dir: Path | None,
        min_accepted: int = 0,
        round_timeout_s: float | None = None,
        institution_of_node: Callable[[int], str] = lambda node_id: "",
        witness_log: WitnessLog | None = None,
    ) -> None:
        self.sampler = sampler
        # The provenance log whose head every training message asks its site to cosign.
        self.witness_log = witness_log
        self.min_accepted = min_accepted
        self.round_timeout_s = round_timeout_s
        # Who a node is, from the SuperNode keys onboarding registered, which the
        # SuperLink verified: what each reply's outcome is recorded against, and the
        # institution its update must be signed for (`check_sender`).
        self.institution_of_node = institution_of_node
        self._sent: tuple[ArrayRecord, ConfigRecord, Grid] | None = None
        self.job_id = job_id
        self.store = store
        self.rule = rule
        self.round_offset = round_offset
        self.retention_dir = retention_dir
        self.rounds: dict[int, RoundProvenance] = {}
        self._reference: Arrays = {}
        self._round_rule = rule  # `rule` with this round's norm bound

    def summary(self) -> None:
        log.info(
            "Consortium strategy: %s over %s", self.rule.describe(), type(self.sampler).__name__
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        round_ = self.round_offset + server_round
        self._reference = {name: array.numpy() for name, array in arrays.items()}
        digest = arrays_digest(self._reference)
        self._round_rule = self.rule.bounded(self._reference)
        self.rounds[round_] = RoundProvenance(
            round=round_,
            global_digest=digest,
            aggregation={**self.rule.describe(), **self._round_rule.describe()},
        )
        config["global-digest"] = digest
        config["job-id"] = self.job_id
        config["round-number"] = round_
        # The sites get the model as one safetensors array (consortium/model_wire.py);
        # Flower's loop keeps the tensors by name.
        packed = pack_tensors(self._reference)
        self._sent = (packed, config, grid)
        return self._messages(server_round, packed, config, grid)

    def _messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Flower's messages for the round, each asking its site to cosign the log's head."""
        messages = list(self.sampler.configure_train(server_round, arrays, config, grid))
        if self.witness_log is None:
            return messages
        record = self.rounds[self.round_offset + server_round]
        view = LogView.read(self.witness_log.path)
        witnessed: list[Message] = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            request = view.request_for(self.institution_of_node(node_id))
            if request is None:
                return messages  # no head yet (the job logs one before its first round)
            record.witnessed = WitnessedHead(
                request.tree_size, request.root_hash, self.witness_log.coordinator_key_id
            )
            witnessed.append(with_witness_request(message, request))
        return witnessed

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = self.rounds[self.round_offset + server_round]
        admitted = self._admit_all(record, replies)
        attempt = 1
        while len(admitted) < self.min_accepted:
            if attempt == ROUND_ATTEMPTS or self._sent is None:
                raise TooFewUpdatesError(
                    _too_few_message(record, len(admitted), attempt, self.min_accepted)
                )
            for update in admitted:  # this attempt does not count
                record.updates.append(
                    _refusal(
                        update.node_id,
                        update.institution,
                        RETRIED,
                        f"attempt {attempt} of round {record.round} had "
                        f"{len(admitted)} accepted update(s), fewer than {self.min_accepted}",
                    )
                )
            attempt += 1
            log.warning(
                "round %d: %d accepted update(s), fewer than min_clients = %d; "
                "sending the round again (attempt %d of %d)",
                record.round,
                len(admitted),
                self.min_accepted,
                attempt,
                ROUND_ATTEMPTS,
            )
            arrays, config, grid = self._sent
            messages = self._messages(server_round, arrays, config, grid)
            replies = grid.send_and_receive(messages, timeout=self.round_timeout_s)
            admitted = self._admit_all(record, replies)
        if not admitted:  # min_accepted 0: nothing to aggregate, the model stays
            return None, None
        result = aggregate(
            self._round_rule,
            self._reference,
            [(u.arrays, u.statement.num_examples) for u in admitted],
        )
        record.accepted = admitted
        record.aggregate_digest = arrays_digest(result)
        for update in admitted:
            record.updates.append({**update.log_entry(), "accepted": True, "reason": ""})
            if self.retention_dir is not None:
                retain(
                    self.retention_dir,
                    self.job_id,
                    record.round,
                    update.statement.update_digest,
                    update.arrays,
                    update.statement.num_examples,
                )
        record.train_loss = _train_loss(admitted)
        metrics = None
        if record.train_loss is not None:
            metrics = MetricRecord({"train_loss": record.train_loss})
        return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in result.items()}), metrics

    def _admit_all(
        self, record: RoundProvenance, replies: Iterable[Message]
    ) -> list[AdmittedUpdate]:
        """The replies that pass admission and the update checks, one per institution;
        each refusal is added to the round's record."""
        rule = self._round_rule
        admitted: list[AdmittedUpdate] = []
        for reply in sorted(replies, key=lambda m: m.metadata.src_node_id):
            node_id = reply.metadata.src_node_id
            # Every outcome is the node's institution's: the reply's signature record is
            # the site's word, so a site could otherwise have its junk logged against
            # another institution (in the signed round record and the failure message).
            owner = self.institution_of_node(node_id)
            try:
                update = admit(
                    reply,
                    self.job_id,
                    record.round,
                    record.global_digest,
                    self.store,
                    record.witnessed,
                )
                check_sender(update, owner)
                check_update(rule, self._reference, update.arrays, update.statement.num_examples)
            except UpdateRefused as refused:
                institution = owner or refused.institution
                record.updates.append(
                    _refusal(node_id, institution, refused.reason, refused.detail)
                )
                continue
            except UpdateRejected as rejected:
                record.updates.append(
                    _refusal(node_id, update.institution, str(rejected.reason), str(rejected))
                )
                continue
            admitted.append(update)
        return _one_per_institution(admitted, record)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # the coordinator evaluates centrally on the held-out split

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None


@dataclass(frozen=True)
class WitnessLog:
    """The provenance log a job's sites witness, and the coordinator key that signs it."""

    path: Path
    coordinator_key_id: str


def with_witness_request(message: Message, request: WitnessRequest) -> Message:
    """A copy of `message` that also asks its site to cosign the log's head (Flower's
    sampler gives every message one shared RecordDict; each site gets its own proofs)."""
    content = RecordDict(dict(message.content.items()))
    content[WITNESS_RECORD] = ConfigRecord(
        {"head": request.head_line, "proofs": request.proofs_json()}
    )
    return Message(
        content=content,
        dst_node_id=message.metadata.dst_node_id,
        message_type=message.metadata.message_type,
    )


def check_sender(update: AdmittedUpdate, owner: str) -> None:
    """Refuse an update signed for another institution than `owner`, the one its node's
    SuperNode key was onboarded for (as federated pretraining does, diloco_sites.py).
    Checked before one-per-institution: else a stolen key let a site's update count as
    the key's institution's, and, from a lower node id, displace that institution's own
    as its "duplicate". `owner` "" (no onboarded key names the node: a plain-text
    coordinator has none) leaves nothing to check against."""
    if owner and update.institution != owner:
        raise UpdateRefused(
            IMPERSONATION,
            f"the reply is signed for {update.institution!r}, but node {update.node_id} "
            f"belongs to {owner!r}",
            owner,
        )


def _one_per_institution(
    admitted: list[AdmittedUpdate], record: RoundProvenance
) -> list[AdmittedUpdate]:
    """Keep one update per institution, the same whatever the arrival order: the one from
    its lowest node id (then lowest digest and nonce); refuse the rest as duplicates.
    Their nonces stay claimed: a duplicate cannot be sent again."""
    kept: dict[str, AdmittedUpdate] = {}
    for update in sorted(
        admitted,
        key=lambda u: (u.node_id, u.statement.update_digest, u.statement.nonce),
    ):
        first = kept.get(update.institution)
        if first is None:
            kept[update.institution] = update
            continue
        record.updates.append(
            _refusal(
                update.node_id,
                update.institution,
                DUPLICATE,
                f"{update.institution!r} already contributed this round's update "
                f"(node {first.node_id})",
            )
        )
    return [u for u in admitted if kept[u.institution] is u]


def _train_loss(admitted: list[AdmittedUpdate]) -> float | None:
    """The example-weighted mean of the finite training losses (admission refuses others;
    a sum that overflows gives None rather than an infinity in the round's metrics)."""
    losses = [
        (u.train_loss, u.statement.num_examples)
        for u in admitted
        if u.train_loss is not None and math.isfinite(u.train_loss)
    ]
    if not losses:
        return None
    try:
        mean = math.fsum(x * n for x, n in losses) / math.fsum(n for _, n in losses)
    except OverflowError:
        return None
    return mean if math.isfinite(mean) else None


def _too_few_message(record: RoundProvenance, accepted: int, attempts: int, minimum: int) -> str:
    """Why the job fails: the round, the counts, and each refused update's sender and
    reason (the last of each institution's, which says the most)."""
    refused: dict[str, str] = {}
    for update in record.updates:
        if not update["accepted"] and update["reason"] != RETRIED:
            who = update["institution"] or f"node {update['node_id']}"
            refused[who] = f"{update['reason']}: {str(update['detail'])[:DETAIL_CHARS]}"
    reasons = "; ".join(f"{who}: {why}" for who, why in sorted(refused.items()))
    return (
        f"round {record.round} had {accepted} accepted update(s) in the last of {attempts} "
        f"attempt(s), fewer than min_clients = {minimum}"
        + (f"; refused: {reasons}" if reasons else "; no site answered in time")
    )


def _refusal(node_id: int, institution: str, reason: str, detail: str) -> dict[str, Any]:
    log.warning(
        "refused update from node %s (%s): %s: %s",
        node_id,
        institution or "unknown",
        reason,
        detail,
    )
    return {
        "institution": institution,
        "node_id": str(node_id),
        "accepted": False,
        "reason": reason,
        "detail": detail,
    }
