"""Client settings (TOML < CONSORTIUM_CLIENT_* environment < flags)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from client.federated.fast_poll_supernode import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_POLL_INTERVAL_S,
    HEARTBEAT_BOUNDS_S,
)
from client.federated.site_trainer import DEFAULT_MEMORY_BUDGET_BYTES
from consortium.names import name_problem
from consortium.ray_env import RayPortRange
from consortium.settings import RoleSettings
from consortium.workloads import BUILTIN_WORKLOADS


class ClientSettings(RoleSettings):
    model_config = SettingsConfigDict(env_prefix="CONSORTIUM_CLIENT_", extra="forbid")

    coordinator: str  # host:port of the control-plane API
    institution: str = Field(min_length=1, max_length=128)
    data: Path  # the site's data dir; never leaves the site
    gpu: int | None = Field(default=None, ge=0)
    # The workloads this site runs (installed packages' entry points, docs/workloads.md);
    # a job naming another is refused here. The consortium never ships code to a site.
    workloads: list[str] = Field(default_factory=lambda: list(BUILTIN_WORKLOADS), min_length=1)
    # What the site trainer may keep loaded between a job's messages: models' weights
    # and buffers, in MiB (client/federated/site_trainer.py). 0: nothing is kept.
    trainer_memory_mb: int = Field(default=DEFAULT_MEMORY_BUDGET_BYTES >> 20, ge=0)
    # Load the ClientApp (torch, the training code) in the background right after
    # starting, so the first task does not wait seconds for it; false: at the first
    # task (1.4 s of CPU and torch's memory less for a site that never gets one).
    preload_client_app: bool = True
    insecure: bool = False
    # Startup bundle from the operator (mutual TLS, SuperNode auth, Ray token).
    bundle: Path | None = None
    # Where the SuperNode's logs go; default: .consortium-client/<institution>
    state_dir: Path | None = None
    supernode_port: int = Field(default=0, ge=0, le=65535)  # 0: a free port
    # How long the SuperNode waits between pulls of the SuperLink when it found no
    # message (Flower's own SuperNode: 3 s; client/federated/fast_poll_supernode.py),
    # and the site's task runner between its polls of the SuperNode while a job runs.
    supernode_poll_interval_s: float = Field(default=DEFAULT_POLL_INTERVAL_S, gt=0, le=60)
    # The heartbeat interval the SuperNode declares (Flower's: 30 s; the SuperLink takes
    # bounds [10, 1800]). A node that died is taken for gone after two of them, and a
    # round that sampled it waits that long.
    supernode_heartbeat_interval_s: float = Field(
        default=DEFAULT_HEARTBEAT_INTERVAL_S,
        ge=HEARTBEAT_BOUNDS_S[0],
        le=HEARTBEAT_BOUNDS_S[1],
    )
    # The loopback forwarder between the SuperNode and the coordinator's Fleet edge.
    fleet_forwarder_port: int = Field(default=0, ge=0, le=65535)  # 0: a free port
    connect_attempts: int = Field(default=6, ge=1)
    connect_backoff_s: float = Field(default=0.5, gt=0)
    # Prometheus endpoint (/metrics); port 0: any free (written to
    # <state_dir>/metrics.address).
    metrics_address: str = "127.0.0.1:0"
    # Contribute this machine (its GPU, else one CPU) to the consortium's shared Ray pool
    # for pretraining. Off unless asked for: every member holding the cluster token can
    # run code on a pool node, so it belongs on a machine dedicated to the consortium,
    # with no site keys or private data beside it (docs/security.md, "The Ray pool is
    # opt-in").
    ray_enabled: bool = False
    # On leave, Ray drains this node: it waits this long for running work before ending
    # its processes (Ray's RAY_DRAIN_TIMEOUT, set on the worker it starts).
    ray_drain_timeout_s: float = Field(default=5.0, ge=0)
    # "LOW-HIGH": every port this node's Ray processes listen on, for a firewall that
    # lets the coordinator's Ray head in (docs/operations.md, "Ports and directions").
    ray_port_range: RayPortRange = None

    @field_validator("institution")
    @classmethod
    def _institution_is_a_name(cls, institution: str) -> str:
        # It may come from a bundle, which nothing signs, and names the state dir.
        problem = name_problem(institution)
        if problem is not None:
            raise ValueError(problem)
        return institution

    @model_validator(mode="after")
    def _port_range_is_for_a_pool_node(self) -> ClientSettings:
        # A range given without --ray would otherwise be ignored in silence: a site
        # upgraded from when the pool was the default would stop contributing unawares.
        if self.ray_port_range is not None and not self.ray_enabled:
            raise ValueError(
                "ray_port_range is for a node of the Ray pool: add --ray (ray_enabled = "
                "true) to contribute this machine, or drop the range"
            )
        return self

    @property
    def resolved_state_dir(self) -> Path:
        return self.state_dir or Path(".consortium-client") / self.institution

    @property
    def metrics_address_file(self) -> Path:
        return self.resolved_state_dir / "metrics.address"
