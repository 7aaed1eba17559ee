"""A secure consortium as the member-attack tests see it: two onboarded institutions, and
each one's (or the operator's) channel to the control plane
(tests/security/test_member_attacks.py, test_member_limits.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from consortium.proto.v1 import jobs_pb2_grpc, nodes_pb2_grpc
from consortium.site_keys import SiteKeys
from consortium.tls import ClientTls
from coordinator.access.pki_files import CoordinatorPki
from coordinator.data_dir import DataDir
from coordinator.state import SqliteStateStore
from tests.helpers import auth_refusals

NAMES = ("alpha", "beta")
JOB = 'name = "{name}"\nmodel = "digits-cnn"\ndataset = "digits"\nrounds = 2\nmin_clients = {n}\n'


@dataclass
class Consortium:
    root: Path
    data_dir: Path
    address: str

    def as_institution(self, name: str) -> ClientTls:
        site = self.root / name
        return ClientTls(
            site / "bundle" / "ca.crt",
            site / "bundle" / "institution.crt",
            SiteKeys(site / "state").tls_key,
        )

    def as_operator(self) -> ClientTls:
        return CoordinatorPki(self.data_dir).operator_tls()

    def jobs(self, tls: ClientTls) -> jobs_pb2_grpc.JobsStub:
        return jobs_pb2_grpc.JobsStub(grpc.secure_channel(self.address, tls.credentials()))

    def registry(self, tls: ClientTls) -> nodes_pb2_grpc.NodeRegistryStub:
        return nodes_pb2_grpc.NodeRegistryStub(grpc.secure_channel(self.address, tls.credentials()))

    def refusals(self, reason: str) -> float:
        return auth_refusals(self.data_dir, "control_plane", reason)

    def log(self) -> str:
        return (self.root / "logs" / "coordinator.log").read_text(errors="replace")

    def job_count(self) -> int:
        store = SqliteStateStore(DataDir(self.data_dir).state_db)
        try:
            return len(store.list_jobs())
        finally:
            store.close()


def rpc_error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value
