"""The coordinator's PKI files in its data dir, written by `coordinator init`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from consortium.errors import SettingsError
from consortium.tls import ClientTls, ServerTls
from coordinator.data_dir import DataDir

OPERATOR = "operator"  # common name of the operator's own client certificate


@dataclass(frozen=True)
class CoordinatorPki:
    data_dir: Path

    @property
    def root(self) -> Path:
        return DataDir(self.data_dir).pki_dir

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def operator_key(self) -> Path:
        return self.root / "operator.key"

    @property
    def operator_cert(self) -> Path:
        return self.root / "operator.crt"

    @property
    def ray_token(self) -> Path:
        return self.root / "ray-token"

    def exists(self) -> bool:
        return self.ca_cert.exists() and self.server_cert.exists()

    def require(self) -> None:
        if not self.exists():
            raise SettingsError(
                f"no consortium PKI in {self.root}: run `coordinator init --data-dir "
                f"{self.data_dir}` first (or pass --insecure for a loopback experiment)"
            )

    def server_tls(self) -> ServerTls:
        return ServerTls(self.ca_cert, self.server_cert, self.server_key)

    def operator_tls(self) -> ClientTls:
        return ClientTls(self.ca_cert, self.operator_cert, self.operator_key)
