"""Coordinator settings (TOML < CONSORTIUM_COORDINATOR_* environment < flags)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from consortium.ray_env import RayPortRange
from consortium.settings import RoleSettings
from coordinator.data_dir import DataDir


class CoordinatorSettings(RoleSettings):
    model_config = SettingsConfigDict(env_prefix="CONSORTIUM_COORDINATOR_", extra="forbid")

    data_dir: Path = Path(".consortium")
    # Control-plane gRPC API; port 0 lets the OS choose (the chosen address is
    # written to <data_dir>/coordinator.address).
    listen_address: str = "127.0.0.1:0"
    # The name or address sites reach this coordinator by (coordinator/addresses.py):
    # what coordinator.address, and so every bundle, names for the API, and what sites
    # are told for a runtime bound to a wildcard host. Default: listen_address's host
    # (required when that is a wildcard). The server certificate must name it.
    public_host: str | None = None
    superlink_host: str = "127.0.0.1"
    superlink_port: int = Field(default=0, ge=0, le=65535)  # 0: a free port
    # The Fleet edge (mutual TLS, Fleet API only): the one Flower address sites reach;
    # the SuperLink itself stays on loopback. Port 0: the one used last time, else any
    # free. A wildcard host (0.0.0.0) makes sites use the coordinator's host.
    fleet_edge_address: str = "127.0.0.1:0"
    insecure: bool = False
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    node_timeout_s: float = Field(default=10.0, gt=0)
    scheduler_poll_interval_s: float = Field(default=1.0, gt=0)
    # How often a running federated job asks Flower for its run's status; the ServerApp
    # reports its own end, so this only catches runs that died without a word.
    flower_status_interval_s: float = Field(default=30.0, gt=0)
    superlink_start_timeout_s: float = Field(default=60.0, gt=0)
    # Prometheus endpoint (/metrics); port 0: any free (written to metrics.address).
    metrics_address: str = "127.0.0.1:0"
    # Shared compute: a Ray head started by `serve` (its GCS on ray_host:ray_port;
    # port 0: the one used last time, else any free), or, with ray_address set, an
    # existing cluster to attach to. ray_enabled = false runs without Ray (pretrain
    # jobs then fail with a message saying so).
    ray_enabled: bool = True
    ray_address: str | None = None
    ray_host: str = "127.0.0.1"
    ray_port: int = Field(default=0, ge=0, le=65535)
    # "LOW-HIGH": every port the head's Ray processes listen on besides ray_port
    # (docs/operations.md, "Ports and directions"); none: Ray picks them.
    ray_port_range: RayPortRange = None
    ray_start_timeout_s: float = Field(default=60.0, gt=0)
    # Mutual TLS on the Ray channel from the consortium CA (needs `coordinator init`;
    # docs/onboarding.md, "The Ray channel").
    ray_tls: bool = False

    @field_validator("ray_host")
    @classmethod
    def _ray_host_is_an_address(cls, host: str) -> str:
        # Ray announces this address to every node and they dial it back: a name or a
        # wildcard would be announced as is.
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"must be an IP address (Ray announces it), not {host!r}") from None
        if address.is_unspecified:
            raise ValueError(f"must be this host's address on the sites' network, not {host!r}")
        return host

    @property
    def paths(self) -> DataDir:
        """Every path under `data_dir`, named once (coordinator/data_dir.py)."""
        return DataDir(self.data_dir)

    @property
    def state_path(self) -> Path:
        return self.paths.state_db

    @property
    def address_file(self) -> Path:
        return self.paths.address_file

    @property
    def metrics_address_file(self) -> Path:
        return self.paths.metrics_address_file

    @property
    def models_dir(self) -> Path:
        return self.paths.models_dir

    @property
    def logs_dir(self) -> Path:
        return self.paths.logs_dir
