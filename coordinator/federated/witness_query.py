"""When a job ends, its sites cosign the head over its final record.

A round's messages ask each site to cosign the head the log had when the round began;
the heads written after the last round (its record, `job_completed`) would stay
unwitnessed. So the ServerApp sends every node one `query.witness` message carrying the
latest head and its consistency proofs (`coordinator/provenance/witnessing.py`), checks
each cosignature that comes back against the key pinned to the institution it names, and
logs the good ones. A site that does not answer in time, or refuses, is logged and
left out: the job has already completed.
"""

from __future__ import annotations

import logging
from typing import Protocol

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from consortium.provenance.log import WitnessCosignature
from consortium.provenance.witness import COSIGNATURE_RECORD, WITNESS_QUERY, WITNESS_RECORD
from coordinator.provenance.recorder import JobRecorder
from coordinator.provenance.witnessing import (
    CosignatureRefused,
    LogView,
    WitnessedHead,
    check_cosignature,
)

log = logging.getLogger(__name__)

# At most this long for the sites' cosignatures of the final head: the job is done, and a
# site that is down must not hold up its end.
FINAL_WITNESS_TIMEOUT_S = 30.0


class Sites(Protocol):
    """Who a node is and which keys its institution signs with (`RunningJob`)."""

    def institution_of_node(self, flower_node_id: int) -> str: ...

    def institution_keys(self, institution: str) -> dict[str, bytes]: ...

    def is_revoked(self, institution: str) -> bool: ...


def witness_latest_head(
    grid: Grid, recorder: JobRecorder, sites: Sites, timeout_s: float
) -> list[str]:
    """Ask every node to cosign the log's latest head; log and return who did."""
    view = LogView.read(recorder.log.path)
    messages = []
    for node_id in grid.get_node_ids():
        request = view.request_for(sites.institution_of_node(node_id))
        if request is None:
            return []
        asking = ConfigRecord({"head": request.head_line, "proofs": request.proofs_json()})
        messages.append(
            Message(
                content=RecordDict({WITNESS_RECORD: asking}),
                dst_node_id=node_id,
                message_type=WITNESS_QUERY,
            )
        )
    if not messages or request is None:
        return []
    head = WitnessedHead(request.tree_size, request.root_hash, recorder.coordinator_key_id)
    cosignatures: dict[str, WitnessCosignature] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %s did not cosign the final head: %s", node_id, reply.error.reason)
            continue
        cosignature = _checked(reply, head, sites)
        if cosignature is not None:
            cosignatures.setdefault(cosignature.institution, cosignature)
    recorder.cosignatures(list(cosignatures.values()))
    return sorted(cosignatures)


def _checked(reply: Message, head: WitnessedHead, sites: Sites) -> WitnessCosignature | None:
    node_id = reply.metadata.src_node_id
    fields = reply.content.config_records.get(COSIGNATURE_RECORD)
    named = str(fields.get("institution", "")) if fields is not None else ""
    known = sites.institution_of_node(node_id)
    institution = known or named
    if named != institution or sites.is_revoked(institution):
        log.warning("node %s's cosignature names %r; not logged", node_id, named)
        return None
    try:
        return check_cosignature(
            fields,
            institution,
            sites.institution_keys(institution),
            head,
        )
    except CosignatureRefused as refused:
        log.warning("node %s (%s): %s", node_id, institution, refused)
        return None
