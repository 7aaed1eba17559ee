"""Job specs: TOML in, a validated `FederatedJobSpec` or `PretrainJobSpec` out.

`parse_submitted_spec` dispatches on the ``kind`` key: "federated" (the default)
is described below; "pretrain" is `coordinator.pretraining.spec.PretrainJobSpec`
(see docs/pretraining.md).

A federated job spec:

Example::

    name = "digits-fedavg"
    kind = "federated"
    workload = "digits-cnn"  # an installed workload (docs/workloads.md)
    dataset = "digits"
    strategy = "fedavg"      # or "fedprox" (then set proximal_mu > 0)
    aggregation = "mean"     # or "trimmed-mean", "median", "krum"
    rounds = 20
    min_clients = 3
    local_epochs = 1
    learning_rate = 0.05
    batch_size = 32
    seed = 0

A fine-tuning stage of a pipeline starts from another job's output model and trains
the byte-level language model on each site's own text (`dataset = "docstrings"`)::

    name = "docstrings-finetune"
    workload = "bytelm"
    dataset = "docstrings"
    init_from = "<job id>"   # a pretraining (or federated) job; its model and size
    rounds = 3
    local_steps = 20         # AdamW steps per round at each site
    seq_len = 64
    learning_rate = 0.001

Every error names the field, so the user can fix the file.
"""

from __future__ import annotations

import functools
import tomllib
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from consortium.errors import JobSpecError, UnknownWorkloadError
from consortium.models import MAX_PARAMETERS, step_tokens_problem
from consortium.workloads import OptionValue, load_workload
from coordinator.pretraining.spec import PretrainJobSpec, validate_pretrain_spec
from coordinator.state import JobRecord

# Bounds a member's spec cannot exceed: a spec is untrusted input (docs/security.md).
MAX_SPEC_BYTES = 64 * 1024
MAX_CLIENTS = 1_000
MAX_ROUND_TIMEOUT_S = 7 * 24 * 3600.0

# A model option as a spec may give it: a number, a flag or a string (a path, say).
SpecOption = int | float | Annotated[str, StringConstraints(max_length=4096)] | bool


class FederatedJobSpec(BaseModel):
    # allow_inf_nan: `round_timeout_s = inf` or `learning_rate = nan` are refused; strict:
    # `learning_rate = "0.05"` (a string) too, where lax parsing would have converted it.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    name: str = Field(min_length=1, max_length=128, description="A name for people; not unique.")
    kind: Literal["federated"] = Field(default="federated", description="The job kind.")
    workload: str = Field(
        validation_alias=AliasChoices("workload", "model"),
        description=(
            "The workload every site trains: an installed package's entry point in the "
            "`consortium.workloads` group (built in: `digits-cnn` for `digits`, `bytelm` "
            "for `docstrings`; docs/workloads.md). `model` is its older name."
        ),
    )
    dataset: str = Field(
        description=(
            "The dataset each site trains on, from its own data dir, in the format "
            "docs/onboarding.md gives (step 4); one the workload trains on."
        )
    )
    strategy: Literal["fedavg", "fedprox"] = Field(
        default="fedavg",
        description=(
            "How Flower samples sites and what it sends them: FedAvg, or FedProx "
            "with `proximal_mu`."
        ),
    )
    rounds: int = Field(gt=0, le=10_000, description="Federated rounds to run.")
    min_clients: int = Field(
        default=2,
        ge=1,
        le=MAX_CLIENTS,
        description=(
            "Sites a round is sent to at least, and accepted updates a round needs "
            "to count; a round short of it is sent again (3 attempts), then the job"
            " fails."
        ),
    )
    local_epochs: int = Field(
        default=1,
        gt=0,
        le=1_000,
        description="Passes over the site's data per round (classification).",
    )
    learning_rate: float = Field(
        default=0.05,
        gt=0,
        le=10,
        description="The sites' SGD learning rate (AdamW for language models).",
    )
    batch_size: int = Field(default=32, gt=0, le=65_536, description="Examples per local step.")
    proximal_mu: float = Field(
        default=0.0, ge=0, le=1e6, description="FedProx: weight of the proximal term; 0 is FedAvg."
    )
    seed: int = Field(
        default=0, ge=0, lt=2**31, description="Seeds sampling and every site's local shuffling."
    )
    round_timeout_s: float = Field(
        default=600.0,
        gt=0,
        le=MAX_ROUND_TIMEOUT_S,
        description="How long a round waits for the sites' replies.",
    )
    aggregation: Literal["mean", "trimmed-mean", "median", "krum"] = Field(
        default="mean",
        description=(
            "How accepted updates are combined (docs/aggregation.md); every rule "
            "shares the same validation."
        ),
    )
    trim_fraction: float = Field(
        default=0.1,
        ge=0,
        lt=0.5,
        description="trimmed-mean: the fraction cut from each end per coordinate.",
    )
    krum_byzantine: int = Field(
        default=0, ge=0, le=MAX_CLIENTS, description="krum: the number of Byzantine sites assumed."
    )
    max_update_norm: float | None = Field(
        default=None,
        gt=0,
        description=(
            "The largest global L2 norm an update may have; none: 10 times the "
            "global model's (docs/aggregation.md)."
        ),
    )
    retain_updates: bool = Field(
        default=True,
        description=(
            "Keep every accepted update, so `coordinator replay` can recompute each"
            " aggregate bit for bit."
        ),
    )
    init_from: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="Start from this job's output model (its model family and size): a pipeline.",
    )
    model_options: dict[str, SpecOption] = Field(
        default_factory=dict,
        max_length=16,
        description=(
            "The workload's options for a model built from scratch: numbers, flags or "
            "strings (bytelm: n_layer, n_head, n_embd, block_size; hf-lora: base_model, "
            "base_model_digest, lora_r, ...)."
        ),
    )
    local_steps: int = Field(
        default=20,
        gt=0,
        le=1_000_000,
        description="Language models: AdamW steps per round at each site.",
    )
    seq_len: int = Field(
        default=64, gt=0, le=65_536, description="Language models: the training window in bytes."
    )
    eval_batches: int = Field(
        default=16,
        gt=0,
        le=100_000,
        description="Batches of the held-out split the coordinator evaluates on after each round.",
    )

    @field_validator("workload")
    @classmethod
    def _installed_workload(cls, value: str) -> str:
        try:
            load_workload(value)
        except UnknownWorkloadError as err:
            raise ValueError(str(err)) from None
        return value

    @field_validator("dataset")
    @classmethod
    def _dataset_of_the_workload(cls, value: str, info: ValidationInfo) -> str:
        name = info.data.get("workload")
        if name is None:
            return value
        datasets = load_workload(name).datasets
        if datasets and value not in datasets:
            known = ", ".join(sorted(datasets))
            raise ValueError(f"workload {name!r} trains on {known}, not {value!r}")
        return value

    @field_validator("model_options")
    @classmethod
    def _options_build(
        cls, value: dict[str, OptionValue], info: ValidationInfo
    ) -> dict[str, OptionValue]:
        # Sized from the config alone: nothing is allocated for a spec (a member once
        # asked for a 51 GB model inside the RPC handler). Checked without options too,
        # unless the model comes from init_from: a workload may require some.
        name = info.data.get("workload")
        if name is not None and (value or info.data.get("init_from") is None):
            try:
                count = load_workload(name).parameter_count(value)
            except (TypeError, KeyError) as err:
                raise ValueError(f"bad options for workload {name!r}: {err}") from None
            if count > MAX_PARAMETERS:
                raise ValueError(
                    f"the model would have {count:,} parameters; the limit is "
                    f"{MAX_PARAMETERS:,} (shrink n_layer, n_embd or block_size)"
                )
        return value

    @model_validator(mode="after")
    def _options_or_source(self) -> FederatedJobSpec:
        if (problem := step_tokens_problem(self.batch_size, self.seq_len)) is not None:
            raise ValueError(problem)
        if self.init_from is not None and self.model_options:
            raise ValueError(
                "model_options and init_from exclude each other: a fine-tuning job "
                "takes its model size from the job it starts from"
            )
        return self


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
    return _federated(parse_submitted_spec(text), "the spec")


def spec_of(job: JobRecord) -> JobSpec:
    """The typed spec of a stored job. Its text was validated when it was submitted, the
    one place a spec is checked; parsed once per process and kept (records are frozen)."""
    return _stored_spec(job.spec_toml)


def federated_spec_of(job: JobRecord) -> FederatedJobSpec:
    return _federated(spec_of(job), f"job {job.job_id}")


@functools.lru_cache(maxsize=256)
def placement_of(job: JobRecord) -> str:
    """Where a job's work runs: a pretraining job's ``placement``; "federated" for a
    federated job (its sites, over Flower)."""
    spec = spec_of(job)
    return spec.placement if isinstance(spec, PretrainJobSpec) else "federated"


def _stored_spec(spec_toml: str) -> JobSpec:
    return parse_submitted_spec(spec_toml)


def _federated(spec: JobSpec, what: str) -> FederatedJobSpec:
    if not isinstance(spec, FederatedJobSpec):
        raise JobSpecError(f"invalid job spec: field 'kind': {what} is a {spec.kind} job")
    return spec


def _load_toml(text: str) -> dict[str, object]:
    size = len(text.encode())
    if size > MAX_SPEC_BYTES:
        raise JobSpecError(
            f"invalid job spec: the spec is {size} bytes; the limit is {MAX_SPEC_BYTES}"
        )
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise JobSpecError(f"job spec is not valid TOML: {err}") from None
    except RecursionError:
        raise JobSpecError("invalid job spec: the TOML is nested too deeply") from None


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
