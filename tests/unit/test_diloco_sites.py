"""Federated pretraining's workers are the institutions' sites: `FlowerSites` under a
real `DiLoCoController`, each site answering through the real signing mod and the real
inner loop (`client/federated/diloco_task.py`), some of them dishonest.

The grid here delivers each message to its site in-process (a test seam for the
SuperLink, which tests/integration/test_federated_job.py runs for real).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from client.federated import diloco_task
from client.federated.diloco_task import run_diloco_step
from client.federated.signing_mod import signing_mod
from consortium.diloco_wire import (
    DiLoCoTaskError,
    read_worker_config,
    site_device,
    worker_config_json,
)
from consortium.errors import CommitRefusedError
from consortium.inner_loop import corpus_for
from consortium.model_wire import ARRAYS_RECORD, pack_tensors, unpack_tensors
from consortium.models import MAX_PARAMETERS
from consortium.provenance.log import ProvenanceLog
from consortium.provenance.records import JobStarted
from consortium.provenance.signing import SigningKey
from coordinator.federated.diloco_sites import FlowerSites
from coordinator.federated.strategy import WitnessLog
from coordinator.pretraining.diloco import DiLoCoController
from coordinator.pretraining.records import OuterStepRecord
from coordinator.pretraining.spec import PretrainJobSpec, parse_pretrain_spec
from coordinator.pretraining.worker_config import worker_config
from coordinator.state import InMemoryStateStore
from tests.helpers import FEDERATED_PRETRAIN

JOB = "job-fed-pretrain"
NODE_A, NODE_B, NODE_C = 11, 22, 33
INSTITUTION = {NODE_A: "uni-a", NODE_B: "uni-b", NODE_C: "uni-c"}

# One shard per site, so all three train in every step.
SPEC = f"""\
name = "sites"
{FEDERATED_PRETRAIN.replace("num_shards = 2", "num_shards = 3")}inner_steps = 3
outer_steps = 2
min_workers = 1
device = "cpu"
inner_optimizer_state = "reset"
verify_fraction = 1.0
step_timeout_s = 5.0
wait_for_workers_s = 0.0
"""

Reply = Callable[[Message, Context], Message]


@dataclass(frozen=True)
class Site:
    institution: str
    node_id: int
    key: Path
    state_dir: Path
    coordinator_key: Path

    def context(self, institution: str | None = None, key: Path | None = None) -> Context:
        return Context(
            run_id=1,
            node_id=self.node_id,
            node_config={
                "institution": institution or self.institution,
                "signing-key": str(key or self.key),
                "state-dir": str(self.state_dir),
                "coordinator-key": str(self.coordinator_key),
                "device": "cpu",
            },
            state=RecordDict(),
            run_config={},
        )


def honest(msg: Message, context: Context) -> Message:
    return run_diloco_step(msg, context.node_config)


def perturbing(msg: Message, context: Context) -> Message:
    """Trains, then sends (and signs) a slightly different pseudo-gradient."""
    reply = honest(msg, context)
    arrays = unpack_tensors(reply.content.array_records[ARRAYS_RECORD])
    name = sorted(arrays)[0]
    changed = dict(arrays)
    changed[name] = arrays[name].copy()
    changed[name].flat[0] += 1
    reply.content[ARRAYS_RECORD] = pack_tensors(changed)
    return reply


def inflating(msg: Message, context: Context) -> Message:
    """Trains honestly but claims (and signs) twice the sequences it trained on."""
    reply = honest(msg, context)
    metrics = reply.content.metric_records["metrics"]
    metrics["num-examples"] = int(str(metrics["num-examples"])) * 2
    return reply


class Sites:
    """The grid as the ServerApp sees it; each node answers through the real signing
    mod around `behaviour[node]`; a node without one never answers."""

    def __init__(self, sites: dict[int, Site], behaviour: dict[int, Reply | None]) -> None:
        self.sites = sites
        self.behaviour = behaviour
        self.contexts: dict[int, Context] = {n: s.context() for n, s in sites.items()}

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def send_and_receive(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
        stop: threading.Event | None = None,
    ) -> Iterable[Message]:
        replies = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            reply = self.behaviour.get(node_id)
            if reply is None:
                continue  # a straggler: its reply comes after the step's deadline
            # The site's process knows its node id; its reply comes from it.
            TaskIdentity._node_id = node_id
            try:
                replies.append(signing_mod(message, self.contexts[node_id], reply))
            finally:
                TaskIdentity._node_id = SUPERLINK_NODE_ID
        return replies


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the ServerApp runtime sets before messages can be built (restored after)."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)  # a site's, as it answers


@dataclass
class World:
    root: Path
    spec: PretrainJobSpec
    store: InMemoryStateStore
    sites: dict[int, Site]
    log: WitnessLog
    rejoined: dict[int, str] = field(default_factory=dict)  # new node ids, as onboarded

    def institution_of_node(self, flower_node_id: int) -> str:
        return INSTITUTION.get(flower_node_id) or self.rejoined.get(flower_node_id, "")

    # AdmissionState, from the store
    def is_revoked(self, institution: str) -> bool:
        return self.store.is_revoked(institution)

    def institution_keys(self, institution: str) -> dict[str, bytes]:
        return self.store.institution_keys(institution)

    def claim_nonce(self, job_id: str, nonce: str) -> bool:
        return self.store.claim_nonce(job_id, nonce)

    def declared_examples(self, institution: str) -> int | None:
        return self.store.declared_examples(institution)

    def run(self, grid: Sites, name: str = "ckpt") -> list[OuterStepRecord]:
        stop = threading.Event()
        config = worker_config(self.spec, corpus_for(self.spec).digest, "cpu")
        sites = FlowerSites(grid, self, JOB, config, self.spec.device, self.log, stop)
        records: list[OuterStepRecord] = []
        with DiLoCoController(
            self.spec, sites, self.root / name, stop=stop, inner_loops=sites
        ) as controller:
            controller.run(records.append)
        return records


@pytest.fixture
def world(tmp_path: Path) -> World:
    coordinator = SigningKey.generate()
    coordinator.save(tmp_path / "coordinator.key")
    log = ProvenanceLog(tmp_path / "log.jsonl", coordinator)
    log.append_record(JobStarted(job_id=JOB, kind="pretrain", seed=0))
    log.publish_tree_head()
    store = InMemoryStateStore()
    sites = {}
    for node_id, institution in INSTITUTION.items():
        key = SigningKey.generate()
        key.save(tmp_path / f"{institution}.key")
        store.add_institution_key(institution, key.key_id, key.public.raw)
        sites[node_id] = Site(
            institution,
            node_id,
            tmp_path / f"{institution}.key",
            tmp_path / "sites" / institution,
            tmp_path / "coordinator.key.pub",
        )
    (tmp_path / "coordinator.key.pub").write_bytes(coordinator.public.pem())
    return World(
        tmp_path,
        parse_pretrain_spec(SPEC),
        store,
        sites,
        WitnessLog(log.path, coordinator.key_id),
    )


def test_honest_sites_train_each_step_and_every_contribution_verifies(world: World) -> None:
    grid = Sites(world.sites, {NODE_A: honest, NODE_B: honest, NODE_C: honest})
    records = world.run(grid)
    assert [r.step for r in records] == [0, 1]
    for record in records:
        assert sorted(r.institution for r in record.results) == ["uni-a", "uni-b", "uni-c"]
        assert sorted(record.verified) == sorted(r.worker for r in record.results)
        assert record.workers_lost == {}
    # The same job at the same sites, run again from scratch, lands on the same bits.
    again = world.run(Sites(world.sites, {NODE_A: honest, NODE_B: honest, NODE_C: honest}), "2")
    assert again[-1].model_digest == records[-1].model_digest


def test_a_run_stopped_after_a_step_resumes_from_its_checkpoint_to_the_same_bits(
    world: World,
) -> None:
    """The ServerApp of a resumed job (the coordinator restarted) builds a new controller
    on the job's checkpoint dir: it continues after the last step, to the same model."""
    behaviour: dict[int, Reply | None] = {NODE_A: honest, NODE_B: honest, NODE_C: honest}
    whole = world.run(Sites(world.sites, behaviour), "whole")
    config = worker_config(world.spec, corpus_for(world.spec).digest, "cpu")
    grid = Sites(world.sites, behaviour)
    sites = FlowerSites(grid, world, JOB, config, "cpu", world.log, threading.Event())
    with DiLoCoController(world.spec, sites, world.root / "split", inner_loops=sites) as first:
        assert first.step() is not None
    resumed = world.run(Sites(world.sites, behaviour), "split")
    assert [r.step for r in resumed] == [1]
    assert resumed[-1].model_digest == whole[-1].model_digest


def test_a_run_that_lost_its_job_checkpoints_nothing(world: World) -> None:
    """A stale ServerApp (a newer run owns the job) is refused at its step's commit,
    before its checkpoint would overwrite the owner's."""

    def stale() -> None:
        raise CommitRefusedError("stale_run", "a newer Flower run owns the job")

    grid = Sites(world.sites, {NODE_A: honest, NODE_B: honest, NODE_C: honest})
    config = worker_config(world.spec, corpus_for(world.spec).digest, "cpu")
    sites = FlowerSites(grid, world, JOB, config, "cpu", world.log, threading.Event())
    with (
        DiLoCoController(
            world.spec, sites, world.root / "owned", inner_loops=sites, fence=stale
        ) as controller,
        pytest.raises(CommitRefusedError),
    ):
        controller.step()
    assert not (world.root / "owned").exists() or not any((world.root / "owned").iterdir())


def test_a_site_that_perturbs_its_signed_pseudo_gradient_is_caught_and_barred(
    world: World,
) -> None:
    grid = Sites(world.sites, {NODE_A: honest, NODE_B: perturbing, NODE_C: honest})
    first, second = world.run(grid)
    cheat = f"uni-b/site-{NODE_B}"
    assert first.verification_failed == {cheat: str(NODE_B)}
    assert cheat not in {r.worker for r in first.results}
    assert first.workers_lost[cheat].startswith("verification failed: its pseudo-gradient")
    # Barred for the rest of the job: not even asked in the next step.
    assert cheat not in {r.worker for r in second.results}
    assert cheat not in second.workers_lost
    assert sorted(r.institution for r in second.results) == ["uni-a", "uni-c"]


def test_a_caught_institution_stays_barred_when_its_site_rejoins_as_another_node(
    world: World,
) -> None:
    grid = Sites(world.sites, {NODE_A: honest, NODE_B: perturbing, NODE_C: honest})
    config = worker_config(world.spec, corpus_for(world.spec).digest, "cpu")
    sites = FlowerSites(grid, world, JOB, config, "cpu", world.log, threading.Event())
    with DiLoCoController(world.spec, sites, world.root / "r", inner_loops=sites) as controller:
        first = controller.step()
        assert first is not None and f"uni-b/site-{NODE_B}" in first.verification_failed
        # uni-b's SuperNode comes back under a new Flower node id, honest this time.
        world.rejoined[66] = "uni-b"
        grid.sites = {**{n: s for n, s in world.sites.items() if n != NODE_B}}
        grid.sites[66] = replace(world.sites[NODE_B], node_id=66)
        grid.behaviour[66] = honest
        grid.contexts[66] = grid.sites[66].context()
        second = controller.step()
    assert second is not None
    assert sorted(r.institution for r in second.results) == ["uni-a", "uni-c"]
    assert "uni-b/site-66" not in second.workers_lost  # not even asked


def test_a_reply_signed_with_another_institutions_key_is_refused(world: World) -> None:
    """uni-b's node, holding uni-a's key, signs its update as uni-a: its SuperNode key
    says it is uni-b, so the step refuses it (and does not count it for uni-a)."""
    grid = Sites(world.sites, {NODE_A: honest, NODE_B: honest, NODE_C: honest})
    stolen = world.sites[NODE_A].key
    grid.contexts[NODE_B] = world.sites[NODE_B].context(institution="uni-a", key=stolen)
    first, _ = world.run(grid)
    lost = first.workers_lost[f"uni-b/site-{NODE_B}"]
    assert lost.startswith("update refused (impersonation)")
    assert sorted(r.institution for r in first.results) == ["uni-a", "uni-c"]


def test_a_reply_naming_another_institution_without_its_key_is_refused(world: World) -> None:
    grid = Sites(world.sites, {NODE_A: honest, NODE_B: honest, NODE_C: honest})
    grid.contexts[NODE_B] = world.sites[NODE_B].context(institution="uni-a")
    first, _ = world.run(grid)
    assert first.workers_lost[f"uni-b/site-{NODE_B}"].startswith("update refused (unknown_key)")


def test_a_site_claiming_more_sequences_than_the_step_asked_for_is_refused(
    world: World,
) -> None:
    grid = Sites(world.sites, {NODE_A: honest, NODE_B: inflating, NODE_C: honest})
    first, _ = world.run(grid)
    lost = first.workers_lost[f"uni-b/site-{NODE_B}"]
    assert lost.startswith("update refused (weight_mismatch)")


def test_a_site_that_does_not_answer_in_time_is_lost_for_the_step(world: World) -> None:
    grid = Sites(world.sites, {NODE_A: honest, NODE_B: None, NODE_C: honest})
    first, second = world.run(grid)
    assert first.workers_lost == {f"uni-b/site-{NODE_B}": "no reply within step_timeout_s=5.0"}
    assert sorted(r.institution for r in first.results) == ["uni-a", "uni-c"]
    # Sat out the next attempt (the controller's one-attempt quarantine), not barred.
    assert first.verification_failed == {} and second.workers_lost == {}


def test_revoked_institutions_and_unknown_nodes_get_no_slot(world: World) -> None:
    world.store.revoke_institution("uni-c")
    grid = Sites(world.sites, {NODE_A: honest, NODE_B: honest, NODE_C: honest})
    grid.sites = {**world.sites, 44: world.sites[NODE_A]}  # a node no onboarding registered
    config = worker_config(world.spec, corpus_for(world.spec).digest, "cpu")
    sites = FlowerSites(grid, world, JOB, config, "cpu", world.log, threading.Event())
    assert [s.worker_id for s in sites.slots()] == [f"uni-a/site-{NODE_A}", f"uni-b/site-{NODE_B}"]


# --- what a site accepts --------------------------------------------------------------


def test_a_site_refuses_a_model_larger_than_it_trains(world: World) -> None:
    config = worker_config(world.spec, "digest", "cpu")
    text = worker_config_json(config).replace('"n_embd": 32', '"n_embd": 8192')
    text = text.replace('"n_layer": 1', '"n_layer": 64')
    with pytest.raises(DiLoCoTaskError, match=f"more than this site trains \\({MAX_PARAMETERS:,}"):
        read_worker_config(text, "cpu")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"batch_size": 65_536, "seq_len": 32}, "a training step takes at most"),
        ({"seq_len": 4096}, "over the model's block_size"),
    ],
)
def test_a_site_refuses_a_step_larger_than_it_trains(
    world: World, fields: dict[str, int], expected: str
) -> None:
    """A dishonest coordinator's worker config: activations grow with batch x window,
    and a step too large took `client join` down with it (the OOM killer)."""
    config = json.loads(worker_config_json(worker_config(world.spec, "digest", "cpu")))
    with pytest.raises(DiLoCoTaskError, match=expected):
        read_worker_config(json.dumps({**config, **fields}), "cpu")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("[1, 2]", "not a JSON object"), ("{", "cannot be read"), ('{"inner_lr": 1}', "cannot")],
)
def test_a_site_refuses_a_worker_config_it_cannot_read(text: str, expected: str) -> None:
    with pytest.raises(DiLoCoTaskError, match=expected):
        read_worker_config(text, "cpu")


def a_step_message(world: World, device: Literal["auto", "cpu", "gpu"] = "cpu") -> Message:
    """The first `train.diloco` message a step sends, as the coordinator builds it."""
    grid = Sites(world.sites, {})
    config = worker_config(world.spec, corpus_for(world.spec).digest, "cpu")
    sites = FlowerSites(grid, world, JOB, config, device, None, threading.Event())
    captured: list[Message] = []
    grid.send_and_receive = lambda messages, **_: captured.extend(messages) or []  # type: ignore[method-assign]
    with DiLoCoController(world.spec, sites, world.root / device, inner_loops=sites) as controller:
        controller.step()
    return captured[0]


def test_a_site_refuses_shards_outside_the_corpus(world: World) -> None:
    message = a_step_message(world)
    message.content.config_records["config"]["shard-ids"] = [0, world.spec.num_shards]
    with pytest.raises(DiLoCoTaskError, match="names shards outside"):
        run_diloco_step(message, {"device": "cpu"})
    weights = unpack_tensors(message.content.array_records[ARRAYS_RECORD])
    assert all(isinstance(v, np.ndarray) for v in weights.values())
    assert isinstance(message.content.array_records[ARRAYS_RECORD], ArrayRecord)


@pytest.mark.parametrize(
    ("job", "site", "trains_on"),
    [("cpu", "cuda:1", "cpu"), ("auto", "cuda:1", "cuda:1"), ("auto", "cpu", "cpu")],
)
def test_a_site_trains_on_its_own_device_as_far_as_the_job_allows(
    job: str, site: str, trains_on: str
) -> None:
    assert site_device(job, site) == trains_on


def test_a_gpu_job_is_refused_by_a_site_without_a_gpu() -> None:
    with pytest.raises(DiLoCoTaskError, match="client join --gpu N"):
        site_device("gpu", "cpu")


def test_a_gpu_jobs_message_is_refused_by_a_site_without_a_gpu(world: World) -> None:
    with pytest.raises(DiLoCoTaskError, match="client join --gpu N"):
        run_diloco_step(a_step_message(world, "gpu"), {"device": "cpu"})


def test_a_deterministic_step_leaves_the_join_process_torch_settings_as_they_were(
    world: World,
) -> None:
    """`client join` runs other jobs' tasks in the same process: a pretraining step's
    one deterministic thread must not outlive it."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(False)
    diloco_task._kept.clear()  # the trainer is built in this step (it sets determinism)
    try:
        reply = run_diloco_step(a_step_message(world), {"device": "cpu", "torch-threads": 2})
        assert not reply.has_error()
        assert torch.get_num_threads() == 2
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
