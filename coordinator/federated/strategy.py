"""The coordinator's Message-API strategy: Flower samples, we admit and aggregate.

Node sampling and message construction are delegated to Flower's FedAvg or
FedProx. Every reply then goes through `admission.admit` (signature, key,
nonce) and the shared aggregation core (`consortium.aggregation`), which
validates shapes, dtypes, finiteness and the norm bound and aggregates
deterministically: the same accepted updates give the same bits in any
arrival order. What happened to each reply is kept for the provenance log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
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
from consortium.tensor_digest import arrays_digest
from coordinator.federated.admission import AdmissionState, AdmittedUpdate, UpdateRefused, admit
from coordinator.federated.retention import retain

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class AggregationRule:
    name: str = "mean"  # mean | trimmed-mean | median | krum
    trim_fraction: float = 0.1
    krum_byzantine: int = 0
    max_update_norm: float | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "rule": self.name,
            "trim_fraction": self.trim_fraction,
            "krum_byzantine": self.krum_byzantine,
            "max_update_norm": self.max_update_norm,
        }


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
    ) -> None:
        self.sampler = sampler
        self.job_id = job_id
        self.store = store
        self.rule = rule
        self.round_offset = round_offset
        self.retention_dir = retention_dir
        self.rounds: dict[int, RoundProvenance] = {}
        self._reference: Arrays = {}

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
        self.rounds[round_] = RoundProvenance(round=round_, global_digest=digest)
        config["global-digest"] = digest
        config["job-id"] = self.job_id
        config["round-number"] = round_
        messages: Iterable[Message] = self.sampler.configure_train(
            server_round, arrays, config, grid
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = self.rounds[self.round_offset + server_round]
        admitted: list[AdmittedUpdate] = []
        for reply in sorted(replies, key=lambda m: m.metadata.src_node_id):
            try:
                update = admit(reply, self.job_id, record.round, record.global_digest, self.store)
                check_update(
                    self.rule, self._reference, update.arrays, update.statement.num_examples
                )
            except UpdateRefused as refused:
                record.updates.append(
                    _refusal(reply, refused.institution, refused.reason, refused.detail)
                )
                continue
            except UpdateRejected as rejected:
                record.updates.append(
                    _refusal(reply, update.institution, str(rejected.reason), str(rejected))
                )
                continue
            admitted.append(update)
        if not admitted:
            log.warning("round %d: no update accepted; the global model stays", record.round)
            return None, None
        result = aggregate(
            self.rule,
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
        losses = [
            (u.train_loss, u.statement.num_examples) for u in admitted if u.train_loss is not None
        ]
        if losses:
            record.train_loss = sum(x * n for x, n in losses) / sum(n for _, n in losses)
        metrics = None
        if record.train_loss is not None:
            metrics = MetricRecord({"train_loss": record.train_loss})
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in result.items()}), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # the coordinator evaluates centrally on the held-out split

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None


def _refusal(reply: Message, institution: str, reason: str, detail: str) -> dict[str, Any]:
    log.warning(
        "refused update from node %s (%s): %s: %s",
        reply.metadata.src_node_id,
        institution or "unknown",
        reason,
        detail,
    )
    return {
        "institution": institution,
        "node_id": str(reply.metadata.src_node_id),
        "accepted": False,
        "reason": reason,
        "detail": detail,
    }
