"""Pretraining job specs: TOML (or a mapping) in, a validated `PretrainJobSpec` out.

Example::

    name = "stdlib-bytelm"
    kind = "pretrain"
    n_layer = 2
    n_head = 2
    n_embd = 64
    block_size = 64
    seq_len = 64
    inner_steps = 100          # H: local AdamW steps between two synchronisations
    outer_steps = 10
    inner_lr = 3e-3
    outer_lr = 0.7
    outer_momentum = 0.9       # Nesterov
    batch_size = 8
    seed = 0
    min_workers = 2
    per_institution_caps = { aurora = 4 }
    corpus_bytes = 4_194_304
    max_worker_memory_bytes = 17_179_869_184

Every error names the field (``field 'inner_steps': ...``), so the user can fix the file.
Fields marked *operational* may change when a job is resumed from its checkpoint; all
others define the training run and must match the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from consortium.errors import JobSpecError
from consortium.models import check_model_size, step_tokens_problem
from consortium.models.bytelm_config import FLOAT32_BYTES, ByteLMConfig
from consortium.pseudo_gradient_codec import Codec

# Float32 copies of the model a worker holds: weights, gradients, AdamW's two moments and
# the global weights the pseudo-gradient is taken against. Activations are not counted.
WORKER_MODEL_COPIES = 5

# May differ between a checkpoint and the spec that resumes it (see `training_identity`).
OPERATIONAL_FIELDS = frozenset(
    {
        "min_workers",
        "max_workers",
        "per_institution_caps",
        "device",
        "placement",
        "step_timeout_s",
        "worker_start_timeout_s",
        "wait_for_workers_s",
        "max_failed_steps",
        "max_worker_memory_bytes",
        "verify_fraction",
        "verify_tolerance",
    }
)
# Fields added after checkpoints were first written, with the value those checkpoints ran
# with: a checkpoint that lacks one resumes under a spec that has the old value.
IDENTITY_DEFAULTS: Mapping[str, Any] = {"pseudo_gradient_codec": "fp32"}


MAX_TIMEOUT_S = 7 * 24 * 3600.0


class PretrainJobSpec(BaseModel):
    # allow_inf_nan: `step_timeout_s = inf` or `inner_lr = nan` are refused.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    name: str = Field(min_length=1, max_length=128, description="A name for people; not unique.")
    kind: Literal["pretrain"] = Field(default="pretrain", description="The job kind.")
    model: Literal["bytelm"] = Field(
        default="bytelm", description="The model family (a byte-level transformer)."
    )
    corpus: Literal["python-stdlib"] = Field(
        default="python-stdlib",
        description="The training corpus: Python's standard library, sharded across workers.",
    )

    # Model size (consortium.models.bytelm).
    n_layer: int = Field(default=2, ge=1, le=128, description="Transformer layers.")
    n_head: int = Field(default=2, ge=1, le=128, description="Attention heads per layer.")
    n_embd: int = Field(
        default=64, ge=1, le=65_536, description="Model width; a multiple of n_head."
    )
    block_size: int = Field(
        default=64, ge=2, le=65_536, description="Longest context the model takes, in bytes."
    )

    # DiLoCo: H inner AdamW steps per worker, then one outer Nesterov step.
    inner_steps: int = Field(
        gt=0,
        le=1_000_000,
        description="H: AdamW steps each worker takes between two synchronisations.",
    )
    outer_steps: int = Field(
        gt=0, le=1_000_000, description="Synchronisations (outer Nesterov steps) to run."
    )
    inner_lr: float = Field(
        default=3e-3, gt=0, le=1.0, description="The workers' AdamW peak learning rate."
    )
    inner_lr_schedule: Literal["constant", "cosine"] = Field(
        default="cosine", description="Inner learning-rate schedule over the whole run."
    )
    inner_warmup_steps: int = Field(
        default=0, ge=0, le=1_000_000, description="Linear warm-up steps of the inner schedule."
    )
    inner_min_lr_ratio: float = Field(
        default=0.1,
        ge=0,
        le=1.0,
        description="cosine: the final inner learning rate as a fraction of the peak.",
    )
    inner_weight_decay: float = Field(default=0.0, ge=0, le=1.0, description="AdamW weight decay.")
    inner_grad_clip: float = Field(
        default=1.0, gt=0, le=1e6, description="Gradient-norm clip of each inner step."
    )
    inner_optimizer_state: Literal["keep", "reset"] = Field(
        default="keep",
        description=(
            "keep: a worker's AdamW state carries over between outer steps; reset: "
            "it starts fresh at each (what replay needs after a failed attempt)."
        ),
    )
    pseudo_gradient_codec: Codec = Field(
        default="fp32",
        description=(
            "How each worker's pseudo-gradient travels: fp32; fp16 (half the bytes); int8"
            " with one float32 scale per 64 values (3.76x fewer bytes than fp32)."
        ),
    )
    outer_lr: float = Field(
        default=0.7,
        gt=0,
        le=10.0,
        description="Learning rate of the outer Nesterov step on the averaged pseudo-gradient.",
    )
    outer_momentum: float = Field(
        default=0.9, ge=0, lt=1.0, description="Nesterov momentum of the outer step."
    )
    batch_size: int = Field(default=8, gt=0, le=65_536, description="Windows per inner step.")
    seq_len: int = Field(
        default=64, gt=0, description="The training window in bytes; at most block_size."
    )
    seed: int = Field(
        default=0, ge=0, lt=2**31, description="Seeds shard assignment and every worker's sampling."
    )
    deterministic: bool = Field(
        default=True,
        description=(
            "Deterministic kernels on CPU, so `coordinator replay` reproduces every"
            " outer step bit for bit."
        ),
    )

    # Data (consortium.data.stdlib_corpus).
    num_shards: int = Field(
        default=64,
        ge=1,
        le=65_536,
        description="Shards the corpus is cut into and assigned to workers.",
    )
    corpus_bytes: int = Field(
        default=4 * 2**20, gt=0, le=2**40, description="Bytes of the corpus used for training."
    )
    validation_bytes: int = Field(
        default=2**16,
        gt=0,
        le=2**34,
        description="Held-out bytes the validation loss is measured on.",
    )
    eval_batches: int = Field(
        default=8, gt=0, le=100_000, description="Batches of the held-out bytes per evaluation."
    )

    # Scheduling (operational).
    min_workers: int = Field(
        default=1,
        ge=1,
        le=100_000,
        description=(
            "Workers an outer step needs; fewer results make the attempt fail. Operational."
        ),
    )
    max_workers: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Most workers used at once; none: one per shard. Operational.",
    )
    per_institution_caps: dict[str, int] = Field(
        default_factory=dict,
        max_length=1_000,
        description="Most workers per institution, e.g. { aurora = 4 }. Operational.",
    )
    placement: Literal["federated", "ray-pool"] = Field(
        default="federated",
        description=(
            "Where the inner loops run. federated: at each institution's own site, over"
            " the federated channel its `client join` opened (outbound only; the site"
            " signs its pseudo-gradient). ray-pool: on the operator's Ray pool, nodes that"
            " joined with `client join --ray` (one trust domain: docs/security.md)."
            " Operational."
        ),
    )
    device: Literal["auto", "cpu", "gpu"] = Field(
        default="auto",
        description="Where workers train: auto takes a GPU where the node offers one. Operational.",
    )
    step_timeout_s: float = Field(
        default=3600.0,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="How long an outer step waits for its workers' results. Operational.",
    )
    worker_start_timeout_s: float = Field(
        default=300.0,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="How long a worker may take to start. Operational.",
    )
    wait_for_workers_s: float = Field(
        default=60.0,
        ge=0,
        le=MAX_TIMEOUT_S,
        description=(
            "How long a step waits for enough workers before the attempt fails. Operational."
        ),
    )
    max_failed_steps: int = Field(
        default=3,
        ge=1,
        le=1_000,
        description="Failed attempts in a row before the job fails. Operational.",
    )
    max_worker_memory_bytes: int = Field(
        default=16 * 2**30,
        gt=0,
        le=2**40,
        description=(
            "The model's float32 copies a worker holds must fit in this (the spec "
            "is refused otherwise). Operational."
        ),
    )

    verify_tolerance: float = Field(
        default=0.0,
        ge=0,
        le=1.0,
        allow_inf_nan=False,
        description=(
            "How spot checks compare a contribution with the coordinator's re-execution:"
            " 0 compares the pseudo-gradient bit for bit (needs deterministic = true and"
            " device = cpu); above 0 accepts a relative L2 distance up to it, for GPU"
            ' workers, whose kernels do not reproduce bits (docs/pretraining.md, "Spot'
            ' checks on GPUs", has the distances measured). Operational.'
        ),
    )
    verify_fraction: float = Field(
        default=0.0,
        ge=0,
        le=1.0,
        description=(
            "Share of each outer step's contributions the coordinator re-executes on its"
            " own CPU before averaging, comparing the pseudo-gradient (bit for bit, or"
            " within verify_tolerance); a mismatch drops the worker and bars its institution for"
            " the rest of the job. Needs inner_optimizer_state = reset, and with"
            " verify_tolerance = 0 deterministic = true and device = cpu. Operational."
        ),
    )

    @field_validator("verify_fraction")
    @classmethod
    def _contributions_are_reproducible(cls, value: float, info: ValidationInfo) -> float:
        if value == 0:
            return value
        if info.data.get("verify_tolerance", 0.0) > 0:  # close enough is enough: any kernels
            needs: dict[str, object] = {"inner_optimizer_state": "reset"}
            wanted = 'inner_optimizer_state = "reset"'
        else:
            needs = {"deterministic": True, "device": "cpu", "inner_optimizer_state": "reset"}
            wanted = (
                'deterministic = true, device = "cpu" and inner_optimizer_state = "reset"'
                " (or a verify_tolerance above 0)"
            )
        wrong = [f"{k} = {info.data[k]!r}" for k, v in needs.items() if info.data.get(k, v) != v]
        if wrong:
            raise ValueError(
                "re-executing a contribution needs the worker's result to depend on the"
                f" global model, shards and seed alone: {wanted} (this spec has "
                f"{', '.join(wrong)})"
            )
        return value

    @field_validator("n_embd")
    @classmethod
    def _heads_divide_width(cls, value: int, info: ValidationInfo) -> int:
        heads = info.data.get("n_head")
        if heads is not None and value % heads:
            raise ValueError(f"must be a multiple of n_head ({heads}), got {value}")
        return value

    @field_validator("seq_len")
    @classmethod
    def _fits_block(cls, value: int, info: ValidationInfo) -> int:
        block = info.data.get("block_size")
        if block is not None and value > block:
            raise ValueError(f"must be <= block_size ({block}), got {value}")
        return value

    @field_validator("seq_len")
    @classmethod
    def _step_fits(cls, value: int, info: ValidationInfo) -> int:
        batch = info.data.get("batch_size")
        if batch is not None and (problem := step_tokens_problem(batch, value)) is not None:
            raise ValueError(problem)
        return value

    @field_validator("corpus_bytes")
    @classmethod
    def _shards_hold_a_window(cls, value: int, info: ValidationInfo) -> int:
        shards, seq = info.data.get("num_shards"), info.data.get("seq_len")
        if shards is not None and seq is not None and value // shards < 2 * (seq + 1):
            raise ValueError(
                f"{value} bytes over {shards} shards leaves under 2 windows of seq_len+1 "
                f"bytes per shard; raise corpus_bytes or lower num_shards"
            )
        return value

    @field_validator("per_institution_caps")
    @classmethod
    def _caps_are_counts(cls, value: dict[str, int]) -> dict[str, int]:
        for institution, cap in value.items():
            if not institution or cap < 0:
                raise ValueError(
                    f"caps map an institution name to a worker count >= 0; got "
                    f"{institution!r} = {cap}"
                )
        return value

    @field_validator("max_worker_memory_bytes")
    @classmethod
    def _model_fits_worker(cls, value: int, info: ValidationInfo) -> int:
        fields = ("n_layer", "n_head", "n_embd", "block_size")
        if any(f not in info.data for f in fields):
            return value  # a size field is already invalid and reported on its own
        options = {f: info.data[f] for f in fields}
        check_model_size("bytelm", options)
        config = ByteLMConfig(**options)
        needed = WORKER_MODEL_COPIES * FLOAT32_BYTES * config.num_parameters()
        if needed > value:
            raise ValueError(
                f"the model needs {needed} bytes per worker ({config.num_parameters()} "
                f"parameters x {WORKER_MODEL_COPIES} float32 copies: weights, gradients, "
                f"AdamW moments x2, global snapshot) but workers declare {value}; shrink "
                "n_layer/n_embd or raise max_worker_memory_bytes"
            )
        return value

    @property
    def bytelm_config(self) -> ByteLMConfig:
        """The `ByteLMConfig` these size fields describe."""
        return ByteLMConfig(
            n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, block_size=self.block_size
        )

    def worker_memory_bytes(self) -> int:
        return WORKER_MODEL_COPIES * self.bytelm_config.parameter_bytes()

    def training_identity(self) -> dict[str, Any]:
        """The fields that define the run (everything but `OPERATIONAL_FIELDS`)."""
        return self.model_dump(mode="json", exclude=set(OPERATIONAL_FIELDS))

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the whole spec."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def validate_pretrain_spec(data: Mapping[str, Any]) -> PretrainJobSpec:
    """Validate a mapping; raises `JobSpecError` naming every bad field."""
    try:
        return PretrainJobSpec.model_validate(dict(data))
    except ValidationError as err:
        raise JobSpecError(describe_validation_error(err)) from None


def parse_pretrain_spec(text: str) -> PretrainJobSpec:
    """Parse TOML and validate; raises `JobSpecError` naming every bad field."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise JobSpecError(f"job spec is not valid TOML: {err}") from None
    return validate_pretrain_spec(raw)


def describe_validation_error(err: ValidationError) -> str:
    problems = []
    for issue in err.errors():
        field = ".".join(str(part) for part in issue["loc"]) or "(top level)"
        if issue["type"] == "missing":
            problems.append(f"field '{field}': required but missing")
        elif issue["type"] == "extra_forbidden":
            problems.append(f"field '{field}': unknown field")
        else:
            message = issue["msg"].removeprefix("Value error, ")
            problems.append(f"field '{field}': {message}")
    return "invalid pretrain job spec: " + "; ".join(problems)
