"""Every path under the coordinator's data dir, named once.

Layout (all under `root`)::

    state.db                      jobs, rounds, nodes, onboarding (SQLite)
    coordinator.address / .port   the control-plane API (address written last: ready)
    metrics.address               the Prometheus endpoint
    pki/                          CA, server and operator certificates, Ray token
    keys/coordinator-signing.key  signs the provenance log (and .pub beside it)
    keys/coordinator-signing.crt  the CA's X.509 certificate for that key (public)
    provenance/log.jsonl          the signed, Merkle-tree provenance log
    provenance/updates/<job>/<round>/   retained client updates (replay)
    checkpoints/<job>/            per-job checkpoints (federated rounds, DiLoCo steps)
    models/<job>.safetensors      each job's final model
    accounting/<job>.json         compute per institution (pretraining)
    flower/                       SuperLink database and port, Fleet edge port, the Flower
                                  app, FLWR_HOME, the ServerApp launcher's secret and
                                  task tokens
    ray/                          Ray head port, token rotation excludes
    logs/                         children's logs (superlink.log, ray-head.log, ...)
    bundles/<institution>/        startup bundles written by `coordinator onboard`

Code takes a `DataDir` (or builds one from a `Path`) instead of joining strings, so
a file moves in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# How `coordinator serve` tells the processes it starts for Flower (the SuperLink's
# ServerApps) where its data dir is.
DATA_DIR_ENV = "CONSORTIUM_DATA_DIR"


@dataclass(frozen=True)
class DataDir:
    root: Path

    # --- control plane -------------------------------------------------------
    @property
    def state_db(self) -> Path:
        return self.root / "state.db"

    @property
    def address_file(self) -> Path:
        return self.root / "coordinator.address"

    @property
    def port_file(self) -> Path:
        return self.root / "coordinator.port"

    @property
    def metrics_address_file(self) -> Path:
        return self.root / "metrics.address"

    # --- keys ----------------------------------------------------------------
    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    @property
    def signing_key(self) -> Path:
        return self.root / "keys" / "coordinator-signing.key"

    @property
    def signing_public_key(self) -> Path:
        return self.signing_key.with_suffix(".pub")

    @property
    def signing_certificate(self) -> Path:
        """The consortium CA's certificate for the signing key, for publication."""
        return self.signing_key.with_suffix(".crt")

    # --- provenance and job outputs ------------------------------------------
    @property
    def provenance_log(self) -> Path:
        return self.root / "provenance" / "log.jsonl"

    def retained_updates(self, job_id: str, round_: int) -> Path:
        return self.root / "provenance" / "updates" / job_id / str(round_)

    def checkpoints(self, job_id: str) -> Path:
        return self.root / "checkpoints" / job_id

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def model_file(self, job_id: str) -> Path:
        return self.models_dir / f"{job_id}.safetensors"

    @property
    def accounting_dir(self) -> Path:
        return self.root / "accounting"

    def accounting_file(self, job_id: str) -> Path:
        return self.accounting_dir / f"{job_id}.json"

    # --- runtimes --------------------------------------------------------------
    @property
    def flower_dir(self) -> Path:
        return self.root / "flower"

    @property
    def superlink_db(self) -> Path:
        return self.flower_dir / "superlink.db"

    @property
    def superlink_port_file(self) -> Path:
        return self.flower_dir / "superlink.port"

    @property
    def fleet_edge_port_file(self) -> Path:
        """The Fleet edge's port, kept so sites reconnect after a restart."""
        return self.flower_dir / "edge.port"

    @property
    def superexec_secret(self) -> Path:
        """Authenticates the coordinator's ServerApp launcher to the SuperLink (0600)."""
        return self.flower_dir / "superexec.secret"

    @property
    def serverapp_tokens_dir(self) -> Path:
        """Each running ServerApp's task token (0600), removed when it ends."""
        return self.flower_dir / "tokens"

    @property
    def flower_app_dir(self) -> Path:
        return self.flower_dir / "app"

    @property
    def flower_home(self) -> Path:
        return self.flower_dir / "home"

    @property
    def ray_dir(self) -> Path:
        return self.root / "ray"

    @property
    def ray_head_port_file(self) -> Path:
        return self.ray_dir / "head.port"

    @property
    def local_ray_token(self) -> Path:
        """The Ray token of a plain-text (--insecure) coordinator's own head, made on its
        first start: Ray listens beyond loopback whatever its address, so its head takes
        a token in every mode (a consortium's is `pki/ray-token`)."""
        return self.ray_dir / "token"

    @property
    def ray_token_excludes(self) -> Path:
        return self.ray_dir / "token-excludes.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def log_file(self, name: str) -> Path:
        """A child's log, e.g. `log_file("superlink")` -> logs/superlink.log."""
        return self.logs_dir / f"{name}.log"

    def bundle_dir(self, institution: str) -> Path:
        return self.root / "bundles" / institution
