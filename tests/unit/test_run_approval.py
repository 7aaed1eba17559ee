"""The coordinator's signed run approvals, and the site's check of them."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import pytest

from client.federated.run_check import CoordinatorRunCheck
from consortium.proto.v1 import nodes_pb2
from consortium.provenance.signing import SigningKey
from consortium.run_approval import (
    RefusalReason,
    RunApproval,
    RunRefusedError,
    SignedApproval,
    check_run,
)
from coordinator.federated.approvals import RunApprovals

COORDINATOR = SigningKey.generate()
FAB = "ab" * 32


def refusal(signed: SignedApproval, run_id: str = "7", fab: str = FAB, job: str = "j1") -> str:
    with pytest.raises(RunRefusedError) as caught:
        check_run(signed, COORDINATOR.public, run_id, fab, job)
    return str(caught.value.reason)


def test_the_approved_run_app_and_job_pass() -> None:
    signed = RunApproval("7", FAB, "j1").sign(COORDINATOR)
    assert check_run(signed, COORDINATOR.public, "7", FAB, "j1") == RunApproval("7", FAB, "j1")


def test_another_run_app_or_job_is_refused_with_its_reason() -> None:
    signed = RunApproval("7", FAB, "j1").sign(COORDINATOR)
    assert refusal(signed, run_id="8") == RefusalReason.RUN_MISMATCH
    assert refusal(signed, fab="cd" * 32) == RefusalReason.FAB_MISMATCH
    assert refusal(signed, job="j2") == RefusalReason.JOB_MISMATCH


def test_a_statement_signed_by_another_key_or_altered_is_refused() -> None:
    forged = RunApproval("7", FAB, "j1").sign(SigningKey.generate())
    assert refusal(forged) == RefusalReason.BAD_SIGNATURE
    genuine = RunApproval("6", FAB, "j1").sign(COORDINATOR)
    altered = SignedApproval(genuine.statement.replace(b'"6"', b'"7"'), genuine.signature)
    assert refusal(altered) == RefusalReason.BAD_SIGNATURE


def test_a_coordinator_signature_over_something_else_is_not_an_approval() -> None:
    statement = b'{"fab_hash":"' + FAB.encode() + b'","job_id":"j1","run_id":"7"}'
    untyped = SignedApproval(statement, COORDINATOR.sign(statement))
    assert refusal(untyped) == RefusalReason.MALFORMED


def test_a_withdrawn_approval_is_gone() -> None:
    approvals = RunApprovals(COORDINATOR)
    approvals.approve("7", FAB, "j1")
    check_run(approvals.get("7"), approvals.public_key, "7", FAB, "j1")
    approvals.withdraw("7")
    with pytest.raises(Exception, match="approved no Flower run '7'"):
        approvals.get("7")


class NotFound(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.NOT_FOUND


@dataclass
class FakeRegistry:
    """The one NodeRegistry method a site's run check calls."""

    approvals: RunApprovals
    calls: list[str] = field(default_factory=list)

    def GetRunApproval(  # noqa: N802 - the gRPC method's name
        self, request: nodes_pb2.GetRunApprovalRequest, timeout: float
    ) -> nodes_pb2.GetRunApprovalResponse:
        self.calls.append(request.run_id)
        try:
            signed = self.approvals.get(request.run_id)
        except Exception:
            raise NotFound() from None
        return nodes_pb2.GetRunApprovalResponse(
            statement=signed.statement,
            signature=signed.signature,
            coordinator_public_key=self.approvals.public_key.raw,
        )


def site_check(registry: FakeRegistry, pinned: bool = True) -> CoordinatorRunCheck:
    key = COORDINATOR.public if pinned else None
    return CoordinatorRunCheck(registry, key, not_found_wait_s=0)  # type: ignore[arg-type]


def test_site_accepts_an_approved_run() -> None:
    registry = FakeRegistry(RunApprovals(COORDINATOR))
    registry.approvals.approve("7", FAB, "j1")
    site_check(registry)("7", FAB, "j1")


def test_site_refuses_a_run_the_coordinator_never_approved_after_a_short_wait() -> None:
    registry = FakeRegistry(RunApprovals(COORDINATOR))
    with pytest.raises(RunRefusedError) as caught:
        site_check(registry)("9", FAB, "j1")
    assert caught.value.reason is RefusalReason.UNAPPROVED
    assert len(registry.calls) > 1  # asked again: the approval may land a moment late


def test_site_with_a_bundle_refuses_a_coordinator_answering_with_another_key() -> None:
    impostor = FakeRegistry(RunApprovals(SigningKey.generate()))
    impostor.approvals.approve("7", FAB, "j1")
    with pytest.raises(RunRefusedError) as caught:
        site_check(impostor)("7", FAB, "j1")
    assert caught.value.reason is RefusalReason.BAD_SIGNATURE
    # Without a bundle (loopback --insecure) the site takes the coordinator's key.
    site_check(impostor, pinned=False)("7", FAB, "j1")
