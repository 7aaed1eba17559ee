"""Signed model updates on the coordinator, end to end through the real ClientApp mod.

Sites sign their training replies with `client.federated.signing_mod`;
`ConsortiumStrategy` admits them (signature, registered key, nonce), validates
and aggregates them, retains what it accepted, and `coordinator.federated.replay`
reproduces the aggregate from the retained files.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from safetensors import safe_open

from client.federated.signing_mod import (
    COMMITMENT_RECORD,
    SIGNATURE_RECORD,
    record_digest,
    signing_mod,
)
from consortium.aggregation import MAX_WEIGHT
from consortium.data.digits import train_test_split
from consortium.data.docstrings import packages_for, site_text
from consortium.data.site_loaders import count_examples
from consortium.lm import FineTuneConfig, fine_tune
from consortium.model_wire import pack_tensors
from consortium.models import build_model, parameter_tensors
from consortium.provenance.commitment import commit
from consortium.provenance.environment import describe_environment
from consortium.provenance.log import ProvenanceLog, read_lines
from consortium.provenance.records import JobStarted, Round
from consortium.provenance.signing import SignatureError, SigningKey, unb64
from consortium.provenance.updates import UpdateStatement
from consortium.provenance.witness import COSIGNATURE_RECORD
from consortium.tensor_digest import arrays_digest
from consortium.training import LocalTrainingConfig, train_local
from coordinator.data_dir import DataDir
from coordinator.federated.admission import MAX_METRIC_NAME_CHARS, UpdateRefused, check_metrics
from coordinator.federated.replay import ReplayMismatchError, replay_rounds
from coordinator.federated.retention import updates_dir
from coordinator.federated.server_app import JobRun
from coordinator.federated.strategy import (
    DEFAULT_NORM_RATIO,
    ROUND_ATTEMPTS,
    AggregationRule,
    ConsortiumStrategy,
    RoundProvenance,
    TooFewUpdatesError,
    WitnessLog,
    model_norm,
    with_witness_request,
)
from coordinator.jobs.spec import FederatedJobSpec
from coordinator.provenance.recorder import JobRecorder
from coordinator.provenance.witnessing import LogView
from coordinator.state import SqliteStateStore

Arrays = dict[str, npt.NDArray[Any]]

JOB = "job-admission"
ROUND = 1  # round_offset 0, server round 1
NODE_A, NODE_B, NODE_B2 = 11, 22, 23  # NODE_B2: a second SuperNode of uni-b
WEIGHT_A, WEIGHT_B = 30, 10
LOSS_A, LOSS_B = 0.25, 0.75


def model_arrays(seed: int) -> Arrays:
    rng = np.random.default_rng(seed)
    return {
        "fc.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "fc.bias": rng.standard_normal(4).astype(np.float32),
    }


def to_record(arrays: Arrays) -> ArrayRecord:
    """As Flower's loop hands the global model to the strategy (one Array per tensor)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    return {name: array.numpy() for name, array in record.items()}


class FakeGrid:
    """The one Grid method FedAvg.configure_train calls (a test seam, not a Grid)."""

    def __init__(self, node_ids: list[int]) -> None:
        self._node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)


@dataclass(frozen=True)
class Site:
    institution: str
    node_id: int
    key_path: Path
    state_dir: Path  # where the site keeps the log heads it cosigned
    coordinator_key: Path  # checks the heads it is asked to cosign

    def context(self) -> Context:
        return Context(
            run_id=1,
            node_id=self.node_id,
            node_config={
                "institution": self.institution,
                "signing-key": str(self.key_path),
                "state-dir": str(self.state_dir),
                "coordinator-key": str(self.coordinator_key),
            },
            state=RecordDict(),
            run_config={},
        )


def institution_of_node(node_id: int) -> str:
    """Who each SuperNode is, as onboarding registered its key."""
    return {NODE_A: "uni-a", NODE_B: "uni-b", NODE_B2: "uni-b"}.get(node_id, "")


def witnessed_log(root: Path) -> WitnessLog:
    """A coordinator log with the job's start and a head, which every round's sites cosign."""
    coordinator = SigningKey.generate()
    coordinator.save(root / "coordinator.key")
    log = ProvenanceLog(root / "log.jsonl", coordinator)
    log.append_record(JobStarted(job_id=JOB, kind="federated", seed=7))
    log.publish_tree_head()
    return WitnessLog(log.path, coordinator.key_id)


def client_reply(
    msg: Message,
    arrays: Arrays,
    num_examples: int,
    loss: float,
    data_digest: str | None,
    extra_metrics: dict[str, Any] | None = None,
) -> Message:
    """What a site's ClientApp train function returns (before the mod signs it)."""
    metrics = {"num-examples": num_examples, "train_loss": loss, **(extra_metrics or {})}
    content = RecordDict({"arrays": pack_tensors(arrays), "metrics": MetricRecord(metrics)})
    if data_digest is not None:
        content[COMMITMENT_RECORD] = ConfigRecord({"digest": data_digest})
    return Message(content, reply_to=msg)


def train_message(node_id: int, config: ConfigRecord, arrays: Arrays) -> Message:
    content = RecordDict({"arrays": pack_tensors(arrays), "config": config})
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN)


@dataclass
class World:
    root: Path
    model: Arrays
    sites: dict[str, Site]  # "a", "b", "b2" (uni-b's second node), "rogue", "impostor"
    data_digest: str
    log: WitnessLog
    messages: dict[int, Message] = field(default_factory=dict)
    stores: list[SqliteStateStore] = field(default_factory=list)
    registered: list[tuple[str, SigningKey]] = field(default_factory=list)
    declared: dict[str, int] = field(default_factory=dict)  # institution -> examples

    def store(self) -> SqliteStateStore:
        """A fresh state store (nonces are per store) with uni-a's and uni-b's keys."""
        store = SqliteStateStore(self.root / "stores" / f"{len(self.stores)}" / "state.db")
        self.stores.append(store)
        for institution, key in self.registered:
            store.add_institution_key(institution, key.key_id, key.public.raw)
        for institution, examples in self.declared.items():
            store.declare_examples(institution, examples)
        return store

    def strategy(
        self, retention_dir: Path | None = None, rule: AggregationRule | None = None
    ) -> ConsortiumStrategy:
        strategy = ConsortiumStrategy(
            FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2),
            JOB,
            self.store(),
            rule or AggregationRule(),
            round_offset=0,
            retention_dir=retention_dir,
            institution_of_node=institution_of_node,
            witness_log=self.log,
        )
        messages = strategy.configure_train(
            ROUND, to_record(self.model), ConfigRecord({"seed": 7}), FakeGrid([NODE_A, NODE_B])
        )
        if not self.messages:
            self.messages = {m.metadata.dst_node_id: m for m in messages}
        return strategy

    def witnessed(self, message: Message) -> Message:
        """`message` asking its site to cosign the log's head, as the strategy sends it."""
        node_id = message.metadata.dst_node_id
        request = LogView.read(self.log.path).request_for(institution_of_node(node_id))
        assert request is not None
        return with_witness_request(message, request)

    def config(self, **changes: Any) -> ConfigRecord:
        base = self.messages[NODE_A].content.config_records["config"]
        return ConfigRecord({**dict(base), **changes})

    def sign(
        self,
        site: str,
        arrays: Arrays,
        num_examples: int,
        loss: float = 0.5,
        msg: Message | None = None,
        extra_metrics: dict[str, Any] | None = None,
    ) -> Message:
        """Run the real signing mod around a fake ClientApp that returns `arrays`."""
        who = self.sites[site]
        if msg is None:
            msg = self.messages.get(who.node_id) or self.witnessed(
                train_message(who.node_id, self.config(), self.model)
            )

        def call_next(received: Message, context: Context) -> Message:
            return client_reply(
                received, arrays, num_examples, loss, self.data_digest, extra_metrics
            )

        return signing_mod(msg, who.context(), call_next)


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the ServerApp runtime sets before messages can be built (restored after)."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    keys = {name: SigningKey.generate() for name in ("a", "b", "rogue")}
    for name, key in keys.items():
        key.save(tmp_path / "keys" / f"{name}.pem")
    log = witnessed_log(tmp_path)
    coordinator_key = tmp_path / "coordinator.pub"

    def site(institution: str, node_id: int, key: str, name: str) -> Site:
        path = tmp_path / "keys" / f"{key}.pem"
        return Site(institution, node_id, path, tmp_path / "sites" / name, coordinator_key)

    sites = {
        "a": site("uni-a", NODE_A, "a", "a"),
        "b": site("uni-b", NODE_B, "b", "b"),
        "b2": site("uni-b", NODE_B2, "b", "b2"),
        # a key nobody registered, claiming to be uni-b
        "rogue": site("uni-b", NODE_B2, "rogue", "rogue"),
        # uni-a's registered key, claiming to be uni-b
        "impostor": site("uni-b", NODE_B2, "a", "impostor"),
    }
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((8, 3)).astype(np.float32), np.arange(8, dtype=np.int64)
    data = commit("digits", x, y, b"k" * 32)
    w = World(tmp_path, model_arrays(0), sites, data.digest(), log)
    w.registered = [("uni-a", keys["a"]), ("uni-b", keys["b"])]
    w.strategy()  # fixes the train messages the sites receive
    try:
        yield w
    finally:
        for store in w.stores:
            store.close()


@dataclass
class Good:
    arrays_a: Arrays
    arrays_b: Arrays
    reply_a: Message
    reply_b: Message

    @property
    def replies(self) -> list[Message]:
        return [self.reply_a, self.reply_b]


@pytest.fixture
def good(world: World) -> Good:
    arrays_a, arrays_b = model_arrays(1), model_arrays(2)
    return Good(
        arrays_a,
        arrays_b,
        world.sign("a", arrays_a, WEIGHT_A, LOSS_A),
        world.sign("b", arrays_b, WEIGHT_B, LOSS_B),
    )


def run_round(
    world: World,
    replies: list[Message],
    retention_dir: Path | None = None,
    rule: AggregationRule | None = None,
) -> tuple[RoundProvenance, ArrayRecord | None, MetricRecord | None]:
    strategy = world.strategy(retention_dir, rule)
    arrays, metrics = strategy.aggregate_train(ROUND, replies)
    return strategy.rounds[ROUND], arrays, metrics


def refusals(record: RoundProvenance) -> list[tuple[str, str]]:
    return [(u["node_id"], u["reason"]) for u in record.updates if not u["accepted"]]


def accepted_nodes(record: RoundProvenance) -> list[str]:
    return sorted(u["node_id"] for u in record.updates if u["accepted"])


# --- the site side: the signing mod --------------------------------------------------


def test_signing_mod_signature_covers_job_round_global_and_update(world: World) -> None:
    arrays = model_arrays(5)
    reply = world.sign("a", arrays, 17, 0.4)
    proof = reply.content.config_records[SIGNATURE_RECORD]
    statement = UpdateStatement(
        job_id=JOB,
        round=ROUND,
        global_digest=arrays_digest(world.model),
        update_digest=arrays_digest(arrays),
        num_examples=17,
        commitment=world.data_digest,
        nonce=str(proof["nonce"]),
        institution="uni-a",
    )
    key = SigningKey.load(world.sites["a"].key_path)
    key.public.verify(unb64(str(proof["signature"])), statement.to_bytes())
    assert proof["key-id"] == key.key_id
    assert proof["update-digest"] == record_digest(reply.content.array_records["arrays"])
    assert (proof["round"], proof["num-examples"], proof["institution"]) == (ROUND, 17, "uni-a")
    assert reply.metadata.src_node_id == NODE_A
    other = world.sign("a", arrays, 17, 0.4)
    assert other.content.config_records[SIGNATURE_RECORD]["nonce"] != proof["nonce"]


def test_signing_mod_signature_fails_for_other_round(world: World) -> None:
    reply = world.sign("a", model_arrays(5), 17)
    proof = reply.content.config_records[SIGNATURE_RECORD]
    statement = UpdateStatement(
        job_id=JOB,
        round=ROUND + 1,
        global_digest=arrays_digest(world.model),
        update_digest=str(proof["update-digest"]),
        num_examples=17,
        commitment=world.data_digest,
        nonce=str(proof["nonce"]),
        institution="uni-a",
    )
    key = SigningKey.load(world.sites["a"].key_path)
    with pytest.raises(SignatureError):
        key.public.verify(unb64(str(proof["signature"])), statement.to_bytes())


def test_signing_mod_refuses_model_whose_digest_differs_from_announced(world: World) -> None:
    calls: list[Message] = []

    def call_next(received: Message, context: Context) -> Message:
        calls.append(received)
        return client_reply(received, model_arrays(5), 10, 0.1, None)

    tampered = model_arrays(0)
    tampered["fc.bias"][0] = np.nextafter(tampered["fc.bias"][0], np.float32(np.inf))
    msg = train_message(NODE_A, world.config(), tampered)  # announces the real global digest
    reply = signing_mod(msg, world.sites["a"].context(), call_next)

    assert reply.has_error()
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert "global model digest" in str(reply.error.reason)
    assert calls == []  # the site never trained on the unannounced model
    record, _, _ = run_round(world, [reply])
    assert refusals(record) == [(str(NODE_A), "client_error")]


def test_signing_mod_passes_non_train_messages_through_unsigned(world: World) -> None:
    msg = Message(
        RecordDict({"config": world.config()}),
        dst_node_id=NODE_A,
        message_type=MessageType.EVALUATE,
    )

    def call_next(received: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": 3, "eval_loss": 0.5})
        return Message(RecordDict({"metrics": metrics}), reply_to=received)

    reply = signing_mod(msg, world.sites["a"].context(), call_next)
    assert not reply.has_error()
    assert SIGNATURE_RECORD not in reply.content.config_records
    assert reply.content.metric_records["metrics"]["eval_loss"] == 0.5


# --- the coordinator side: admission and aggregation ---------------------------------


def test_aggregate_train_two_signed_updates_gives_exact_weighted_mean(
    world: World, good: Good
) -> None:
    record, arrays, metrics = run_round(world, good.replies)

    assert accepted_nodes(record) == [str(NODE_A), str(NODE_B)]
    assert record.participants == ["uni-a", "uni-b"]
    assert arrays is not None
    result = from_record(arrays)
    total = WEIGHT_A + WEIGHT_B
    for name in world.model:
        reference = (
            WEIGHT_A * good.arrays_a[name].astype(np.float64)
            + WEIGHT_B * good.arrays_b[name].astype(np.float64)
        ) / total
        assert result[name].dtype == np.float32
        np.testing.assert_array_max_ulp(result[name], reference.astype(np.float32), maxulp=1)
    assert record.aggregate_digest == arrays_digest(result)
    expected_loss = (WEIGHT_A * LOSS_A + WEIGHT_B * LOSS_B) / total
    assert metrics is not None
    assert metrics["train_loss"] == pytest.approx(expected_loss, rel=1e-12)
    entries = {u["node_id"]: u for u in record.updates}
    assert entries[str(NODE_A)]["commitment"] == world.data_digest
    assert entries[str(NODE_A)]["num_examples"] == WEIGHT_A
    assert entries[str(NODE_B)]["update_digest"] == arrays_digest(good.arrays_b)


def test_aggregate_digest_is_independent_of_reply_order(world: World, good: Good) -> None:
    nan_update = model_arrays(4)
    nan_update["fc.weight"][1, 2] = np.nan
    bad = world.sign("b2", nan_update, 5)
    replies = [*good.replies, bad]
    digests = set()
    for order in itertools.permutations(replies):
        record, _, _ = run_round(world, list(order))
        assert refusals(record) == [(str(NODE_B2), "non_finite")]
        digests.add(record.aggregate_digest)
    shuffled = list(good.replies)
    random.Random(0).shuffle(shuffled)
    record, _, _ = run_round(world, shuffled)
    digests.add(record.aggregate_digest)
    assert len(digests) == 1
    assert digests != {""}


def _with_value(value: float) -> Callable[[World], Message]:
    def build(world: World) -> Message:
        arrays = model_arrays(4)
        arrays["fc.weight"][2, 1] = value
        return world.sign("b2", arrays, 5)

    return build


def _wrong_shape(world: World) -> Message:
    arrays = model_arrays(4)
    arrays["fc.weight"] = np.ascontiguousarray(arrays["fc.weight"].T)
    return world.sign("b2", arrays, 5)


def _wrong_dtype(world: World) -> Message:
    arrays = {k: v.astype(np.float64) for k, v in model_arrays(4).items()}
    return world.sign("b2", arrays, 5)


def _missing_tensor(world: World) -> Message:
    arrays = model_arrays(4)
    del arrays["fc.bias"]
    return world.sign("b2", arrays, 5)


def _unsigned(world: World) -> Message:
    msg = train_message(NODE_B2, world.config(), world.model)
    return client_reply(msg, model_arrays(4), 5, 0.5, None)


def _unregistered_key(world: World) -> Message:
    return world.sign("rogue", model_arrays(4), 5)


def _other_institutions_key(world: World) -> Message:
    return world.sign("impostor", model_arrays(4), 5)


def _other_round(world: World) -> Message:
    msg = world.witnessed(
        train_message(NODE_B2, world.config(**{"round-number": ROUND + 1}), world.model)
    )
    return world.sign("b2", model_arrays(4), 5, msg=msg)


def _other_global_model(world: World) -> Message:
    other = model_arrays(9)
    msg = world.witnessed(
        train_message(NODE_B2, world.config(**{"global-digest": arrays_digest(other)}), other)
    )
    return world.sign("b2", model_arrays(4), 5, msg=msg)


def _other_job(world: World) -> Message:
    msg = world.witnessed(
        train_message(NODE_B2, world.config(**{"job-id": "another-job"}), world.model)
    )
    return world.sign("b2", model_arrays(4), 5, msg=msg)


def _weights_changed_after_signing(world: World) -> Message:
    reply = world.sign("b2", model_arrays(4), 5)
    swapped = model_arrays(4)
    swapped["fc.bias"] *= 100
    reply.content["arrays"] = pack_tensors(swapped)
    return reply


def _count_changed_after_signing(world: World) -> Message:
    reply = world.sign("b2", model_arrays(4), 5)
    reply.content["metrics"] = MetricRecord({"num-examples": 5000, "train_loss": 0.5})
    return reply


def _signed_count_changed_with_metrics(world: World) -> Message:
    reply = world.sign("b2", model_arrays(4), 5)
    reply.content["metrics"] = MetricRecord({"num-examples": 5000, "train_loss": 0.5})
    proof = reply.content.config_records[SIGNATURE_RECORD]
    proof["num-examples"] = 5000
    return reply


def _with_loss(loss: float) -> Callable[[World], Message]:
    def build(world: World) -> Message:
        return world.sign("b2", model_arrays(4), 5, loss)

    return build


def _with_metric(name: str, value: Any) -> Callable[[World], Message]:
    def build(world: World) -> Message:
        return world.sign("b2", model_arrays(4), 5, extra_metrics={name: value})

    return build


def _scaled_beyond_default_norm(world: World) -> Message:
    """A consistently signed update 100x the global model: a boosted (model-replacement)
    update that the default bound refuses."""
    return world.sign("b2", {k: v * 100 for k, v in world.model.items()}, 5)


def _uncosigned(world: World) -> Message:
    """A correctly signed update whose site did not cosign the log's head."""
    reply = world.sign("b2", model_arrays(4), 5)
    del reply.content[COSIGNATURE_RECORD]
    return reply


def _cosigned_another_head(world: World) -> Message:
    """A cosignature, correctly signed, of a head other than the one the round sent."""
    reply = world.sign("b2", model_arrays(4), 5)
    fields = reply.content.config_records[COSIGNATURE_RECORD]
    fields["root-hash"] = "00" * 32
    return reply


def _cosignature_time_edited(world: World) -> Message:
    """A cosignature whose time was changed after the site signed it."""
    reply = world.sign("b2", model_arrays(4), 5)
    fields = reply.content.config_records[COSIGNATURE_RECORD]
    fields["timestamp"] = int(str(fields["timestamp"])) + 1  # the signature covers the time
    return reply


BAD_UPDATES: dict[str, tuple[Callable[[World], Message], str, int]] = {
    # case: (builder, expected reason, node the refusal is attributed to)
    "nan": (_with_value(float("nan")), "non_finite", NODE_B2),
    "inf": (_with_value(float("-inf")), "non_finite", NODE_B2),
    "shape": (_wrong_shape, "shape", NODE_B2),
    "float64": (_wrong_dtype, "dtype", NODE_B2),
    "missing_tensor": (_missing_tensor, "names", NODE_B2),
    "unsigned": (_unsigned, "unsigned", NODE_B2),
    "unregistered_key": (_unregistered_key, "unknown_key", NODE_B2),
    "other_institutions_key": (_other_institutions_key, "unknown_key", NODE_B2),
    "other_round": (_other_round, "stale", NODE_B2),
    "other_global_model": (_other_global_model, "bad_signature", NODE_B2),
    "other_job": (_other_job, "bad_signature", NODE_B2),
    "weights_changed_after_signing": (
        _weights_changed_after_signing,
        "digest_mismatch",
        NODE_B2,
    ),
    "count_changed_after_signing": (_count_changed_after_signing, "weight_mismatch", NODE_B2),
    "signed_count_edited": (_signed_count_changed_with_metrics, "bad_signature", NODE_B2),
    "nan_train_loss": (_with_loss(float("nan")), "bad_metrics", NODE_B2),
    "inf_train_loss": (_with_loss(float("inf")), "bad_metrics", NODE_B2),
    "list_metric": (_with_metric("train_loss", [0.1, 0.2]), "bad_metrics", NODE_B2),
    "unknown_metric": (_with_metric("accuracy", 0.99), "bad_metrics", NODE_B2),
    "beyond_default_norm": (_scaled_beyond_default_norm, "norm", NODE_B2),
    "uncosigned": (_uncosigned, "uncosigned", NODE_B2),
    "cosigned_another_head": (_cosigned_another_head, "bad_cosignature", NODE_B2),
    "cosignature_time_edited": (_cosignature_time_edited, "bad_cosignature", NODE_B2),
}


@pytest.mark.parametrize("case", sorted(BAD_UPDATES))
def test_aggregate_train_refuses_bad_update_without_changing_aggregate(
    world: World, good: Good, case: str
) -> None:
    build, reason, node = BAD_UPDATES[case]
    baseline, _, _ = run_round(world, good.replies)
    bad = build(world)

    record, arrays, _ = run_round(world, [bad, *good.replies])

    assert refusals(record) == [(str(node), reason)]
    assert accepted_nodes(record) == [str(NODE_A), str(NODE_B)]
    assert record.aggregate_digest == baseline.aggregate_digest
    assert arrays is not None
    assert arrays_digest(from_record(arrays)) == baseline.aggregate_digest


def test_aggregate_train_refuses_second_delivery_as_replayed(world: World, good: Good) -> None:
    baseline, _, _ = run_round(world, good.replies)

    record, _, _ = run_round(world, [good.reply_a, good.reply_b, good.reply_a])

    assert refusals(record) == [(str(NODE_A), "replayed")]
    assert accepted_nodes(record) == [str(NODE_A), str(NODE_B)]
    assert record.aggregate_digest == baseline.aggregate_digest


def test_aggregate_train_refuses_replay_of_update_accepted_in_earlier_round(
    world: World, good: Good
) -> None:
    strategy = world.strategy()
    strategy.aggregate_train(ROUND, good.replies)
    strategy.configure_train(
        ROUND + 1, to_record(model_arrays(6)), ConfigRecord({}), FakeGrid([NODE_A, NODE_B])
    )

    _, metrics = strategy.aggregate_train(ROUND + 1, [good.reply_a])

    assert metrics is None
    assert refusals(strategy.rounds[ROUND + 1]) == [(str(NODE_A), "stale")]


def test_aggregate_train_with_only_bad_updates_keeps_global_model(world: World) -> None:
    record, arrays, metrics = run_round(world, [_unsigned(world), _with_value(np.inf)(world)])

    assert (arrays, metrics) == (None, None)
    assert record.aggregate_digest == ""
    assert sorted(r for _, r in refusals(record)) == ["non_finite", "unsigned"]


@pytest.mark.parametrize("count", [0, -3, MAX_WEIGHT + 1])
def test_aggregate_train_refuses_out_of_range_example_count_without_failing_round(
    world: World, good: Good, count: int
) -> None:
    """A site signing an example count the aggregator cannot use must lose only its own
    update, never abort the round for the honest sites."""
    baseline, _, _ = run_round(world, good.replies)
    bad = world.sign("b2", model_arrays(4), count)  # consistently signed

    record, _, _ = run_round(world, [bad, *good.replies])

    [(node, reason)] = refusals(record)  # the reason name is the fix's choice
    assert (node, bool(reason)) == (str(NODE_B2), True)
    assert accepted_nodes(record) == [str(NODE_A), str(NODE_B)]
    assert record.aggregate_digest == baseline.aggregate_digest


def test_aggregate_train_refuses_non_numeric_signed_count_without_failing_round(
    world: World, good: Good
) -> None:
    """A malformed signature record is a refusal, not an exception out of the round."""
    reply = world.sign("b2", model_arrays(4), 5)
    reply.content.config_records[SIGNATURE_RECORD]["num-examples"] = "five"

    record, _, _ = run_round(world, [reply, *good.replies])

    assert [node for node, _ in refusals(record)] == [str(NODE_B2)]
    assert accepted_nodes(record) == [str(NODE_A), str(NODE_B)]


# --- retention and replay --------------------------------------------------------------


def test_retained_updates_exist_for_accepted_updates_only(world: World, good: Good) -> None:
    bad = [build(world) for build, _, _ in BAD_UPDATES.values()]
    retention = world.root / "data"

    record, _, _ = run_round(world, [*bad, *good.replies, good.reply_a], retention)

    assert accepted_nodes(record) == [str(NODE_A), str(NODE_B)]
    assert len(refusals(record)) == len(bad) + 1
    folder = updates_dir(retention, JOB, ROUND)
    expected = {arrays_digest(good.arrays_a): WEIGHT_A, arrays_digest(good.arrays_b): WEIGHT_B}
    assert {p.name for p in folder.iterdir()} == {f"{d}.safetensors" for d in expected}
    for digest, weight in expected.items():
        with safe_open(str(folder / f"{digest}.safetensors"), framework="numpy") as handle:
            assert handle.metadata() == {"num_examples": str(weight)}
            assert arrays_digest({k: handle.get_tensor(k) for k in handle.keys()}) == digest  # noqa: SIM118


def _round_record(record: RoundProvenance) -> Round:
    """The round record as the ServerApp logs it (the fields replay reads)."""
    return Round.model_validate(
        {
            "job_id": JOB,
            "round": record.round,
            "global_digest": record.global_digest,
            "updates": record.updates,
            "aggregation": AggregationRule().describe(),
            "aggregate_digest": record.aggregate_digest,
        }
    )


def test_replay_rounds_reproduces_aggregate_digest(world: World, good: Good) -> None:
    retention = world.root / "data"
    nan_update = model_arrays(4)
    nan_update["fc.bias"][0] = np.nan
    replies = [world.sign("b2", nan_update, 5), *good.replies]
    record, _, _ = run_round(world, replies, retention)

    [replayed] = replay_rounds(retention, JOB, [_round_record(record)])

    assert replayed.matches
    assert replayed.replayed_digest == record.aggregate_digest
    assert (replayed.round, replayed.updates) == (ROUND, 2)


def test_replay_rounds_detects_tampered_retained_update(world: World, good: Good) -> None:
    retention = world.root / "data"
    record, _, _ = run_round(world, good.replies, retention)
    path = updates_dir(retention, JOB, ROUND) / f"{arrays_digest(good.arrays_b)}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor's data
    path.write_bytes(bytes(data))

    with pytest.raises(ReplayMismatchError, match="does not match the digest"):
        replay_rounds(retention, JOB, [_round_record(record)])


def test_replay_mismatch_names_other_code_when_the_job_ran_other_source(
    world: World, good: Good
) -> None:
    retention = world.root / "data"
    record, _, _ = run_round(world, good.replies, retention)
    wrong = _round_record(record).model_copy(update={"aggregate_digest": "0" * 64})
    ours = describe_environment("cpu", deterministic=True)
    same = JobStarted(job_id=JOB, environment=ours)
    other = JobStarted(
        job_id=JOB,
        environment={**ours, "code": {**ours["code"], "source_digest": "ab" * 32}},
    )
    with pytest.raises(ReplayMismatchError, match="aggregate digest") as plain:
        replay_rounds(retention, JOB, [same, wrong])
    assert "other Consortium code" not in str(plain.value)
    with pytest.raises(ReplayMismatchError, match=r"other Consortium code .* abababab"):
        replay_rounds(retention, JOB, [other, wrong])


# --- one update per institution, declared example counts, metrics ----------------------


def test_aggregate_train_refuses_second_update_of_same_institution_from_other_node(
    world: World, good: Good
) -> None:
    baseline, _, _ = run_round(world, good.replies)
    second = world.sign("b2", model_arrays(4), 5)  # uni-b's other node, validly signed

    for order in ([second, *good.replies], [*good.replies, second]):
        record, _, _ = run_round(world, order)

        assert refusals(record) == [(str(NODE_B2), "duplicate")]
        assert accepted_nodes(record) == [str(NODE_A), str(NODE_B)]
        assert record.participants == ["uni-a", "uni-b"]
        assert record.aggregate_digest == baseline.aggregate_digest


def test_aggregate_train_keeps_same_update_of_one_node_whatever_the_arrival_order(
    world: World, good: Good
) -> None:
    """Two validly signed updates from one node (two nonces): the one kept does not
    depend on which arrived first."""
    other_b = world.sign("b", model_arrays(8), WEIGHT_B)
    digests = set()
    for order in ([good.reply_b, other_b], [other_b, good.reply_b]):
        record, _, _ = run_round(world, [good.reply_a, *order])
        assert refusals(record) == [(str(NODE_B), "duplicate")]
        digests.add(record.aggregate_digest)
    assert len(digests) == 1


def test_aggregate_train_refuses_count_beyond_declared_examples(world: World, good: Good) -> None:
    """A site claiming 100000 examples with 899 declared took 99% of a round's weight."""
    world.declared = {"uni-a": WEIGHT_A, "uni-b": 899}
    only_a, _, _ = run_round(world, [good.reply_a])
    inflated = world.sign("b", model_arrays(2), 100_000)

    record, _, _ = run_round(world, [good.reply_a, inflated])

    assert refusals(record) == [(str(NODE_B), "inflated_count")]
    [entry] = [u for u in record.updates if not u["accepted"]]
    assert entry["institution"] == "uni-b"
    assert "declared 899" in entry["detail"]
    assert record.aggregate_digest == only_a.aggregate_digest
    [accepted] = [u for u in record.updates if u["accepted"]]
    assert accepted["declared_examples"] == WEIGHT_A  # exactly at the cap is accepted


def test_aggregate_train_without_declared_examples_accepts_any_valid_count(
    world: World,
) -> None:
    """A coordinator whose sites declared nothing (plain text, older clients) keeps
    today's behaviour."""
    reply = world.sign("a", model_arrays(1), 100_000)

    record, _, _ = run_round(world, [reply])

    assert accepted_nodes(record) == [str(NODE_A)]
    assert "declared_examples" not in record.updates[0]


@pytest.mark.parametrize(
    ("metrics", "named"),
    [
        ({"train_loss": float("nan")}, "'train_loss' is nan"),
        ({"train_loss": float("-inf")}, "'train_loss' is -inf"),
        ({"train_loss": [1.0]}, "'train_loss' is a list"),
        ({"x" * 5000: 1.0}, "'" + "x" * MAX_METRIC_NAME_CHARS + "' is not one of"),
    ],
)
def test_check_metrics_refuses_naming_the_metric(metrics: dict[str, Any], named: str) -> None:
    with pytest.raises(UpdateRefused, match="bad_metrics") as refused:
        check_metrics({"num-examples": 3, **metrics}, "uni-a")
    assert named in refused.value.detail
    assert refused.value.institution == "uni-a"


def test_refused_update_is_logged_with_institution_and_reason(
    world: World, good: Good, caplog: pytest.LogCaptureFixture
) -> None:
    bad = _with_loss(float("nan"))(world)

    with caplog.at_level(logging.WARNING, logger="coordinator.federated.strategy"):
        run_round(world, [bad, *good.replies])

    [line] = [r.getMessage() for r in caplog.records if "refused update" in r.getMessage()]
    assert "(uni-b): bad_metrics: metric 'train_loss' is nan" in line


def test_round_with_nan_metric_update_completes_and_logs(world: World, good: Good) -> None:
    """A correctly signed update with train_loss = NaN once failed the job while its round
    was logged; now it is refused, and the round is aggregated and signed into the log."""
    data_dir = DataDir(world.root / "coordinator")
    SigningKey.generate().save(data_dir.signing_key)
    strategy = world.strategy()
    _, metrics = strategy.aggregate_train(ROUND, [_with_loss(float("nan"))(world), *good.replies])
    assert metrics is not None and math.isfinite(float(str(metrics["train_loss"])))
    run = JobRun.__new__(JobRun)  # the three fields log_round reads, not a whole ServerApp
    run.job_id = JOB
    run.spec = FederatedJobSpec(name="n", model="digits-cnn", dataset="digits", rounds=1)
    run.provenance = JobRecorder(data_dir, JOB)

    run.log_round(strategy, ROUND, {"accuracy": 0.5, "loss": float("nan"), "train_loss": 0.4})

    rounds = [json.loads(line) for line in read_lines(data_dir.provenance_log)]
    [body] = [r["body"] for r in rounds if r.get("type") == "round"]
    assert body["metrics"] == {"accuracy": 0.5, "train_loss": 0.4}
    assert body["participants"] == ["uni-a", "uni-b"]
    assert [u["reason"] for u in body["updates"] if not u["accepted"]] == ["bad_metrics"]
    assert body["aggregation"]["max_update_norm"] == pytest.approx(
        DEFAULT_NORM_RATIO * model_norm(world.model)
    )


# --- the default norm bound ------------------------------------------------------------


def test_default_norm_bound_is_ratio_of_global_model_norm_and_spec_overrides(
    world: World, good: Good
) -> None:
    boosted = _scaled_beyond_default_norm(world)
    record, _, _ = run_round(world, [boosted, good.reply_a])
    assert refusals(record) == [(str(NODE_B2), "norm")]
    assert record.aggregation["default_norm_ratio"] == DEFAULT_NORM_RATIO

    record, _, _ = run_round(
        world, [boosted, good.reply_a], rule=AggregationRule(max_update_norm=1e6)
    )
    assert refusals(record) == []
    assert record.aggregation["max_update_norm"] == 1e6


def _norm_ratio(model: torch.nn.Module, train: Callable[[torch.nn.Module], object]) -> float:
    reference = {k: v.detach().numpy().copy() for k, v in parameter_tensors(model).items()}
    train(model)
    update = {k: v.detach().numpy() for k, v in parameter_tensors(model).items()}
    return model_norm(update) / model_norm(reference)


def test_default_norm_ratio_is_far_above_honest_digits_and_bytelm_rounds() -> None:
    """First rounds from scratch, where the measured ratios are the largest (digits-cnn at
    its default learning rate; bytelm at 0.05, the spec's default learning rate)."""
    split, _ = train_test_split()
    torch.manual_seed(0)
    digits = _norm_ratio(
        build_model("digits-cnn", {}),
        lambda m: train_local(
            m, split.x, split.y, LocalTrainingConfig(1, 0.05, 32, seed=1), torch.device("cpu")
        ),
    )
    text = np.frombuffer(site_text(packages_for(3)[0], 50_000), np.uint8)
    torch.manual_seed(0)
    bytelm = _norm_ratio(
        build_model("bytelm", {}),
        lambda m: fine_tune(m, text, FineTuneConfig(20, 8, 64, 0.05, seed=1), torch.device("cpu")),
    )

    print(f"honest norm ratios: digits-cnn {digits:.3f}, bytelm {bytelm:.3f}")
    assert digits < DEFAULT_NORM_RATIO / 4
    assert bytelm < DEFAULT_NORM_RATIO / 1.2


def test_count_examples_is_largest_dataset_and_skips_unreadable(tmp_path: Path) -> None:
    """What `client join` declares: rows of the largest array dataset or bytes of text."""
    np.savez(tmp_path / "digits.npz", x=np.zeros((899, 64), np.float32), y=np.zeros(899))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    assert count_examples(tmp_path) == 899
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "docstrings.txt").write_bytes(b"x" * 1500)
    assert count_examples(tmp_path) == 1500


# --- participation: a round counts only with min_clients accepted updates ------------


class ScriptedGrid(FakeGrid):
    """Answers each round sent again with the next scripted replies (a test seam)."""

    def __init__(self, node_ids: list[int], answers: list[list[Message]]) -> None:
        super().__init__(node_ids)
        self.answers = answers
        self.resent = 0

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Message]:
        self.resent += 1
        list(messages)
        return self.answers.pop(0)


def participation_strategy(world: World, grid: FakeGrid) -> ConsortiumStrategy:
    names = {NODE_A: "uni-a", NODE_B: "uni-b"}
    strategy = ConsortiumStrategy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2),
        JOB,
        world.store(),
        AggregationRule(),
        round_offset=0,
        retention_dir=None,
        min_accepted=2,
        institution_of_node=lambda node_id: names.get(node_id, ""),
    )
    strategy.configure_train(ROUND, to_record(world.model), ConfigRecord({"seed": 7}), grid)
    return strategy


def failed_reply(world: World, node_id: int, reason: str) -> Message:
    """What a site's ClientApp that raised sends: an error, with no institution in it."""
    return Message(
        Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=world.messages[node_id]
    )


def test_a_round_with_fewer_accepted_updates_than_min_clients_is_sent_again(
    world: World, good: Good
) -> None:
    retry = [
        world.sign("a", good.arrays_a, WEIGHT_A, LOSS_A),
        world.sign("b", good.arrays_b, WEIGHT_B, LOSS_B),
    ]
    grid = ScriptedGrid([NODE_A, NODE_B], [retry])
    strategy = participation_strategy(world, grid)

    arrays, _ = strategy.aggregate_train(ROUND, [good.reply_a])

    assert grid.resent == 1
    record = strategy.rounds[ROUND]
    assert arrays is not None and record.participants == ["uni-a", "uni-b"]
    # The first attempt's one update is not applied; the log says why.
    assert refusals(record) == [(str(NODE_A), "round_retried")]
    reference, _, _ = run_round(world, good.replies)
    assert record.aggregate_digest == reference.aggregate_digest


def test_a_round_short_of_min_clients_in_every_attempt_fails_naming_each_site_and_why(
    world: World, good: Good
) -> None:
    def attempt() -> list[Message]:
        return [
            world.sign("a", good.arrays_a, WEIGHT_A, LOSS_A),
            failed_reply(world, NODE_B, "ValueError: x has shape (32, 64)"),
        ]

    grid = ScriptedGrid([NODE_A, NODE_B], [attempt() for _ in range(ROUND_ATTEMPTS - 1)])
    strategy = participation_strategy(world, grid)

    with pytest.raises(TooFewUpdatesError) as raised:
        strategy.aggregate_train(ROUND, attempt())

    assert grid.resent == ROUND_ATTEMPTS - 1
    message = str(raised.value)
    assert f"round {ROUND} had 1 accepted update(s)" in message
    assert "fewer than min_clients = 2" in message
    # The failing site is named by institution (from its onboarded SuperNode key),
    # with the error its ClientApp reported.
    assert "uni-b: client_error: ValueError: x has shape (32, 64)" in message
    refused = [u for u in strategy.rounds[ROUND].updates if u["reason"] == "client_error"]
    assert {u["institution"] for u in refused} == {"uni-b"}


# --- who a reply counts for: its node's onboarded institution ---------------------------


def from_node_a_signed_as_b(world: World, key: str) -> str:
    """A site on uni-a's own SuperNode (NODE_A) that signs its replies as uni-b's with
    `key` ("b": uni-b's stolen key; "rogue": a key nobody registered)."""
    name = f"a-as-b-with-{key}"
    world.sites[name] = Site(
        "uni-b",
        NODE_A,
        world.root / "keys" / f"{key}.pem",
        world.root / "sites" / name,
        world.sites["a"].coordinator_key,
    )
    return name


def refused_entries(record: RoundProvenance) -> list[tuple[str, str, str]]:
    return [
        (u["node_id"], u["institution"], u["reason"]) for u in record.updates if not u["accepted"]
    ]


def test_junk_naming_another_institution_is_refused_against_the_senders_own(
    world: World, good: Good, caplog: pytest.LogCaptureFixture
) -> None:
    """uni-a's node replies with an update whose signature record names uni-b: the
    refusal is uni-a's in the round record and the log, never uni-b's."""
    junk = world.sign(from_node_a_signed_as_b(world, "rogue"), model_arrays(4), 5)

    with caplog.at_level(logging.WARNING, logger="coordinator.federated.strategy"):
        record, _, _ = run_round(world, [junk, good.reply_b])

    assert refused_entries(record) == [(str(NODE_A), "uni-a", "unknown_key")]
    assert record.participants == ["uni-b"]
    [line] = [r.getMessage() for r in caplog.records if "refused update" in r.getMessage()]
    assert f"node {NODE_A} (uni-a): unknown_key" in line


def test_a_failed_round_names_the_sender_of_junk_naming_another_institution(
    world: World, good: Good
) -> None:
    def attempt() -> list[Message]:
        return [
            world.sign(from_node_a_signed_as_b(world, "rogue"), model_arrays(4), 5),
            world.sign("b", good.arrays_b, WEIGHT_B, LOSS_B),
        ]

    grid = ScriptedGrid([NODE_A, NODE_B], [attempt() for _ in range(ROUND_ATTEMPTS - 1)])
    strategy = participation_strategy(world, grid)

    with pytest.raises(TooFewUpdatesError) as raised:
        strategy.aggregate_train(ROUND, attempt())

    assert "; refused: uni-a: unknown_key: " in str(raised.value)


def test_update_signed_for_another_institution_from_own_node_is_refused_as_impersonation(
    world: World, good: Good
) -> None:
    """uni-a holds uni-b's stolen key and signs an update as uni-b's from its own node,
    whose id is lower than uni-b's: it is refused, uni-a's, and uni-b's own update from
    uni-b's node still counts (first-wins would have dropped it as a duplicate)."""
    baseline, _, _ = run_round(world, good.replies)
    forged = world.sign(from_node_a_signed_as_b(world, "b"), model_arrays(4), WEIGHT_B)

    record, _, _ = run_round(world, [forged, *good.replies])

    assert refused_entries(record) == [(str(NODE_A), "uni-a", "impersonation")]
    [entry] = [u for u in record.updates if not u["accepted"]]
    assert entry["detail"] == (
        f"the reply is signed for 'uni-b', but node {NODE_A} belongs to 'uni-a'"
    )
    assert accepted_nodes(record) == [str(NODE_A), str(NODE_B)]
    assert record.participants == ["uni-a", "uni-b"]
    assert record.aggregate_digest == baseline.aggregate_digest


def test_a_node_no_onboarded_key_names_counts_for_the_institution_it_signs_for(
    world: World, good: Good
) -> None:
    """A plain-text coordinator registers no SuperNode keys: there is no node to check
    the signed institution against, and the update counts as signed."""
    strategy = ConsortiumStrategy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2),
        JOB,
        world.store(),
        AggregationRule(),
        round_offset=0,
        retention_dir=None,
        institution_of_node=lambda node_id: "",
    )
    strategy.configure_train(
        ROUND, to_record(world.model), ConfigRecord({"seed": 7}), FakeGrid([NODE_A, NODE_B])
    )

    strategy.aggregate_train(ROUND, [*good.replies, _unsigned(world)])

    record = strategy.rounds[ROUND]
    assert record.participants == ["uni-a", "uni-b"]
    assert refused_entries(record) == [(str(NODE_B2), "", "unsigned")]
