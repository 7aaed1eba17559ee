"""Job specs: TOML in, a validated `FederatedJobSpec` or `PretrainJobSpec` out.

`parse_submitted_spec` dispatches on the ``kind`` key: "federated" (the default)
is described below; "pretrain" is `coordinator.compute.spec.PretrainJobSpec`
(see docs/pretraining.md).

A federated job spec:

Example::

    name = "digits-fedavg"
    kind = "federated"
    model = "digits-cnn"
    dataset = "digits"
    strategy = "fedavg"      # or "fedprox" (then set proximal_mu > 0)
    aggregation = "mean"     # or "trimmed-mean", "median", "krum"
    rounds = 20
    min_clients = 3
    local_epochs = 1
    learning_rate = 0.05
    batch_size = 32
    seed = 0

Every error names the field, so the user can fix the file.
"""

from __future__ import annotations

import tomllib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from consortium.errors import JobSpecError
from consortium.models import MODELS
from coordinator.compute.spec import PretrainJobSpec, validate_pretrain_spec

# Datasets the coordinator knows the schema of and holds a public held-out
# split for; each site maps these names to its own local loader.
KNOWN_DATASETS = frozenset({"digits"})


class FederatedJobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    kind: Literal["federated"] = "federated"
    model: str
    dataset: str
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    rounds: int = Field(gt=0, le=10_000)
    min_clients: int = Field(default=2, ge=1)
    local_epochs: int = Field(default=1, gt=0, le=1_000)
    learning_rate: float = Field(default=0.05, gt=0, le=10)
    batch_size: int = Field(default=32, gt=0, le=65_536)
    proximal_mu: float = Field(default=0.0, ge=0)
    seed: int = Field(default=0, ge=0, lt=2**31)
    round_timeout_s: float = Field(default=600.0, gt=0)
    # How accepted updates are combined; all rules share the same validation.
    aggregation: Literal["mean", "trimmed-mean", "median", "krum"] = "mean"
    trim_fraction: float = Field(default=0.1, ge=0, lt=0.5)
    krum_byzantine: int = Field(default=0, ge=0)
    max_update_norm: float | None = Field(default=None, gt=0)
    # Keep every accepted update so the aggregation can be replayed bit for bit.
    retain_updates: bool = True

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODELS:
            raise ValueError(f"unknown model {value!r}; known: {', '.join(sorted(MODELS))}")
        return value

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in KNOWN_DATASETS:
            known = ", ".join(sorted(KNOWN_DATASETS))
            raise ValueError(f"unknown dataset {value!r}; known: {known}")
        return value


JobSpec = FederatedJobSpec | PretrainJobSpec
FEDERATED = "federated"
PRETRAIN = "pretrain"


def parse_submitted_spec(text: str) -> JobSpec:
    """Parse and validate a spec of any kind; raises JobSpecError naming the bad field."""
    raw = _load_toml(text)
    kind = raw.get("kind", FEDERATED)
    if kind == PRETRAIN:
        return validate_pretrain_spec(raw)
    if kind != FEDERATED:
        raise JobSpecError(
            f"invalid job spec: field 'kind': unknown job kind {kind!r}; "
            f"known: {FEDERATED}, {PRETRAIN}"
        )
    return _validate_federated(raw)


def parse_job_spec(text: str) -> FederatedJobSpec:
    """Parse and validate a federated spec; raises JobSpecError naming the first bad field."""
    return _validate_federated(_load_toml(text))


def _load_toml(text: str) -> dict[str, object]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise JobSpecError(f"job spec is not valid TOML: {err}") from None


def _validate_federated(raw: dict[str, object]) -> FederatedJobSpec:
    try:
        return FederatedJobSpec.model_validate(raw)
    except ValidationError as err:
        raise JobSpecError(_describe(err)) from None


def _describe(err: ValidationError) -> str:
    problems = []
    for issue in err.errors():
        field = ".".join(str(part) for part in issue["loc"]) or "(top level)"
        kind = issue["type"]
        if kind == "missing":
            problems.append(f"field '{field}': required but missing")
        elif kind == "extra_forbidden":
            problems.append(f"field '{field}': unknown field")
        else:
            message = issue["msg"].removeprefix("Value error, ")
            problems.append(f"field '{field}': {message}")
    return "invalid job spec: " + "; ".join(problems)
