"""Federated pretraining's workers: the institutions' own sites, over Flower.

`FlowerSites` is both the `ClusterView` and the `InnerLoops` of a `DiLoCoController`
that runs in the ServerApp (coordinator/federated/pretrain_run.py). Every online
SuperNode of an onboarded, unrevoked institution is one worker slot; the institution
it counts for is the one its SuperNode key was registered to at onboarding (the
SuperLink verified that key), never what the site says. One outer step is one
``train.diloco`` message per planned site (consortium/diloco_wire.py), carrying the
global model, its digest, the shards, the seed and H, and asking the site to cosign the
log's head; sites train behind their own firewalls and answer over the connection they
opened. A reply is admitted exactly as a fine-tuning update is
(coordinator/federated/admission.py: signed by a key registered to its institution,
for this job, outer step and global model, over the pseudo-gradient it carries, with a
fresh nonce and a valid cosignature); one that is refused, or late past
``step_timeout_s``, loses its worker for the step, with the reason in the step's
record. Nothing a site sends is unpickled: the pseudo-gradient travels as safetensors.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from flwr.app import ConfigRecord, Message, RecordDict

from consortium.diloco_wire import (
    COMPUTE_S,
    DEVICE,
    FIRST_INNER_STEP,
    INNER_STEPS,
    MESSAGE_TYPE,
    ON_GPU,
    SEED,
    SHARD_IDS,
    WORKER_CONFIG,
    worker_config_json,
)
from consortium.inner_loop import InnerMetrics, WorkerConfig
from consortium.model_wire import ARRAYS_RECORD, pack_tensors
from consortium.provenance.log import WitnessCosignature
from consortium.provenance.witness import WITNESS_RECORD
from consortium.pseudo_gradient_codec import Encoded
from consortium.tensor_digest import arrays_digest
from coordinator.federated.admission import AdmissionState, UpdateRefused, admit
from coordinator.federated.reasons import IMPERSONATION
from coordinator.federated.reasons import refused as refused_text
from coordinator.federated.strategy import WitnessLog
from coordinator.pretraining.cluster import WorkerSlot
from coordinator.pretraining.inner_loops import (
    Assignment,
    InnerStep,
    Lost,
    Returned,
    StopRequested,
)
from coordinator.provenance.witnessing import LogView, WitnessedHead

log = logging.getLogger(__name__)


class SiteGrid(Protocol):
    """What federated pretraining uses of the ServerApp's Grid (`PromptGrid`)."""

    def get_node_ids(self) -> Iterable[int]: ...

    def send_and_receive(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
        stop: threading.Event | None = None,
    ) -> Iterable[Message]: ...


class SiteDirectory(AdmissionState, Protocol):
    """Who a node is, and admission's reads (`RunningJob`)."""

    def institution_of_node(self, flower_node_id: int) -> str: ...


class _NoExampleCap:
    """Admission's state without the institutions' declared example counts: those bound
    a site's private data, while a pretraining step trains on the shared corpus (its
    size is the coordinator's H x batch, checked against the signed count instead)."""

    def __init__(self, sites: SiteDirectory) -> None:
        self._sites = sites

    def is_revoked(self, institution: str) -> bool:
        return self._sites.is_revoked(institution)

    def institution_keys(self, institution: str) -> dict[str, bytes]:
        return self._sites.institution_keys(institution)

    def claim_nonce(self, job_id: str, nonce: str) -> bool:
        return self._sites.claim_nonce(job_id, nonce)

    def declared_examples(self, institution: str) -> int | None:
        return None


@dataclass(frozen=True)
class _Sent:
    worker_id: str
    institution: str
    witnessed: WitnessedHead | None


class FlowerSites:
    def __init__(
        self,
        grid: SiteGrid,
        sites: SiteDirectory,
        job_id: str,
        config: WorkerConfig,
        device: Literal["auto", "cpu", "gpu"],
        witness_log: WitnessLog | None,
        stop: threading.Event,
    ) -> None:
        self._grid = grid
        self._sites = sites
        self._job_id = job_id
        self._config = config
        self._config_json = worker_config_json(config)
        self._device = device  # what the job allows; each site trains on its own
        self._slot_device: Literal["cpu", "gpu"] = "gpu" if device == "gpu" else "cpu"
        self._witness_log = witness_log
        self._stop = stop
        # The cosignatures the last step's admitted replies carried, by worker: logged
        # with the step's record, once it is committed (`cosignatures`).
        self._cosignatures: dict[str, WitnessCosignature] = {}

    # -- ClusterView --------------------------------------------------------------------

    def slots(self) -> list[WorkerSlot]:
        """One slot per online SuperNode of an onboarded, unrevoked institution."""
        slots = []
        for node_id in sorted(self._grid.get_node_ids()):
            institution = self._sites.institution_of_node(node_id)
            if not institution or self._sites.is_revoked(institution):
                continue
            slots.append(
                WorkerSlot(
                    worker_id=f"{institution}/site-{node_id}",
                    institution=institution,
                    node_id=str(node_id),
                    device=self._slot_device,
                    resource=None,
                )
            )
        return slots

    # -- InnerLoops ---------------------------------------------------------------------

    def reconcile(self, slots: tuple[WorkerSlot, ...]) -> Lost:
        return {}  # a site is ready when its SuperNode is online: nothing to start

    def run(
        self,
        request: InnerStep,
        plan: Mapping[str, Assignment],
        dispatched: Callable[[], None],
    ) -> tuple[Returned, Lost]:
        digest = arrays_digest(request.weights)
        packed = pack_tensors(request.weights)  # once: every site gets the same bytes
        view = LogView.read(self._witness_log.path) if self._witness_log is not None else None
        messages: list[Message] = []
        sent: dict[int, _Sent] = {}
        for worker_id, assignment in sorted(plan.items()):
            node_id = int(assignment.slot.node_id)
            content = RecordDict(
                {
                    ARRAYS_RECORD: packed,
                    "config": ConfigRecord(
                        {
                            "job-id": self._job_id,
                            "round-number": request.step + 1,
                            "global-digest": digest,
                            WORKER_CONFIG: self._config_json,
                            DEVICE: self._device,
                            SHARD_IDS: list(assignment.shard_ids),
                            SEED: assignment.seed,
                            INNER_STEPS: request.inner_steps,
                            FIRST_INNER_STEP: request.first_inner_step,
                        }
                    ),
                }
            )
            witnessed = self._ask_to_witness(content, view, assignment.slot.institution)
            messages.append(
                Message(content=content, dst_node_id=node_id, message_type=MESSAGE_TYPE)
            )
            sent[node_id] = _Sent(worker_id, assignment.slot.institution, witnessed)
        dispatched()  # the plan is final: the messages go out now
        replies = self._grid.send_and_receive(messages, timeout=request.timeout_s, stop=self._stop)
        if self._stop.is_set():
            raise StopRequested
        returned: Returned = {}
        lost: Lost = {}
        self._cosignatures = {}
        for reply in sorted(replies, key=lambda m: m.metadata.src_node_id):
            to = sent.get(reply.metadata.src_node_id)
            if to is None or to.worker_id in returned or to.worker_id in lost:
                continue  # not a node this step asked, or a second reply
            try:
                returned[to.worker_id] = self._admit(reply, request, digest, to)
            except UpdateRefused as refused:
                log.warning("outer step %d, %s: refused: %s", request.step, to.worker_id, refused)
                lost[to.worker_id] = refused_text(refused.reason, refused.detail)
        for worker_id in plan:
            if worker_id not in returned and worker_id not in lost:
                lost[worker_id] = f"no reply within step_timeout_s={request.timeout_s}"
        return returned, lost

    def drop(self, worker_id: str) -> None:
        self._cosignatures.pop(worker_id, None)  # a site keeps nothing of the job here

    def close(self) -> None:
        self._cosignatures = {}

    def cosignatures(self, workers: list[str]) -> list[WitnessCosignature]:
        """The checked cosignatures of `workers` (a step's averaged ones), to log after
        the step's record."""
        return [self._cosignatures[w] for w in workers if w in self._cosignatures]

    # -- one step's messages ------------------------------------------------------------

    def _ask_to_witness(
        self, content: RecordDict, view: LogView | None, institution: str
    ) -> WitnessedHead | None:
        if view is None or self._witness_log is None:
            return None
        request = view.request_for(institution)
        if request is None:
            return None  # no head yet (the job logs one before its first step)
        content[WITNESS_RECORD] = ConfigRecord(
            {"head": request.head_line, "proofs": request.proofs_json()}
        )
        return WitnessedHead(
            request.tree_size, request.root_hash, self._witness_log.coordinator_key_id
        )

    def _admit(
        self, reply: Message, request: InnerStep, digest: str, to: _Sent
    ) -> tuple[Encoded, InnerMetrics]:
        update = admit(
            reply,
            self._job_id,
            request.step + 1,
            digest,
            _NoExampleCap(self._sites),
            to.witnessed,
        )
        if update.institution != to.institution:
            raise UpdateRefused(
                IMPERSONATION,
                f"the reply is signed for {update.institution!r}, but node "
                f"{reply.metadata.src_node_id} belongs to {to.institution!r}",
                update.institution,
            )
        sequences = request.inner_steps * self._config.batch_size
        if update.statement.num_examples != sequences:
            raise UpdateRefused(
                "weight_mismatch",
                f"the update claims {update.statement.num_examples} sequences; the step "
                f"asked for {sequences} ({request.inner_steps} steps x batch "
                f"{self._config.batch_size})",
                update.institution,
            )
        if update.train_loss is None:
            raise UpdateRefused("malformed", "the reply carries no train_loss", to.institution)
        if update.cosignature is not None:
            self._cosignatures[to.worker_id] = update.cosignature
        reported = reply.content.metric_records["metrics"]
        compute_s = reported.get(COMPUTE_S, 0.0)
        loss = update.train_loss
        metrics = InnerMetrics(
            steps=request.inner_steps,
            tokens=sequences * self._config.seq_len,
            mean_loss=loss,
            last_loss=loss,
            # The site's word, like a Ray worker's; admission checked it is finite.
            compute_s=max(float(compute_s), 0.0) if isinstance(compute_s, int | float) else 0.0,
            device="gpu" if reported.get(ON_GPU, 0) == 1 else "cpu",  # the site's word
        )
        return update.arrays, metrics
