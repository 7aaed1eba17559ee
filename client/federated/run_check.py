"""Asks the coordinator whether it approved a Flower run, and checks its signature.

The statement comes over the mutual-TLS control plane, but it is the signature that
counts: it must verify with the coordinator's key from the bundle (endorsed by the
pinned CA). A site joined with `--insecure` (loopback experiments, no bundle) has no
such key and takes the one the coordinator sends: there the check guards against
runs nobody approved, not against a forged coordinator.
"""

from __future__ import annotations

import time

import grpc

from consortium.proto.v1 import nodes_pb2, nodes_pb2_grpc
from consortium.provenance.signing import SignatureError, VerifyingKey
from consortium.run_approval import RefusalReason, RunRefusedError, SignedApproval, check_run

ASK_TIMEOUT_S = 10.0
# The coordinator approves a run right after Flower has started it, seconds before the
# ServerApp's first message can reach a site; a short wait covers a slow coordinator.
NOT_FOUND_RETRIES = 3
NOT_FOUND_WAIT_S = 1.0


class CoordinatorRunCheck:
    def __init__(
        self,
        stub: nodes_pb2_grpc.NodeRegistryStub,
        coordinator_key: VerifyingKey | None,
        not_found_wait_s: float = NOT_FOUND_WAIT_S,
    ) -> None:
        self._stub = stub
        self._key = coordinator_key  # None: --insecure, take the coordinator's word
        self._not_found_wait_s = not_found_wait_s

    def __call__(self, run_id: str, fab_hash: str, job_id: str) -> None:
        reply = self._ask(run_id)
        try:
            key = self._key or VerifyingKey.from_raw(reply.coordinator_public_key)
        except SignatureError as err:
            raise RunRefusedError(RefusalReason.MALFORMED, str(err)) from None
        check_run(SignedApproval(reply.statement, reply.signature), key, run_id, fab_hash, job_id)

    def _ask(self, run_id: str) -> nodes_pb2.GetRunApprovalResponse:
        request = nodes_pb2.GetRunApprovalRequest(run_id=run_id)
        for attempt in range(NOT_FOUND_RETRIES + 1):
            try:
                reply: nodes_pb2.GetRunApprovalResponse = self._stub.GetRunApproval(
                    request, timeout=ASK_TIMEOUT_S
                )
                return reply
            except grpc.RpcError as error:
                code = error.code() if isinstance(error, grpc.Call) else None
                if code != grpc.StatusCode.NOT_FOUND:
                    raise RunRefusedError(
                        RefusalReason.UNREACHABLE,
                        f"could not ask the coordinator about run {run_id}: {code}",
                    ) from None
                if attempt < NOT_FOUND_RETRIES:
                    time.sleep(self._not_found_wait_s)
        raise RunRefusedError(
            RefusalReason.UNAPPROVED, f"the coordinator approved no Flower run {run_id}"
        )
