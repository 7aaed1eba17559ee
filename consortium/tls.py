"""gRPC TLS credentials from the consortium PKI files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class ClientTls:
    """What a node or the operator CLI presents to the coordinator."""

    ca_cert: Path
    cert: Path
    key: Path

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert.read_bytes(),
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )


@dataclass(frozen=True)
class ServerTls:
    ca_cert: Path
    cert: Path
    key: Path

    def credentials(self) -> grpc.ServerCredentials:
        # Mutual TLS: every caller must present a certificate from our CA.
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.ca_cert.read_bytes(),
            require_client_auth=True,
        )
