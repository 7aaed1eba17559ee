"""Workloads: what a federated job trains, as a Python package installed at every site.

A workload builds a model from options, loads a site's dataset by name from the site's
own data dir, trains it for one round's budget from given weights, evaluates it, and
says which parameters travel (all, or a subset such as adapters). The coordinator may
also score the global model on public held-out data the workload ships. A package
registers a workload under the `consortium.workloads` entry-point group::

    [project.entry-points."consortium.workloads"]
    my-model = "my_package.workload:workload"   # an object with the methods below

A job spec names it (`workload = "my-model"`); each site lists in its settings which
workloads it runs (`workloads = [...]`) and refuses the others: the consortium never
ships code to a site. Where a workload came from (distribution, version and a digest of
its package's source files) is recorded in the job's provenance. The two built-in
workloads, `digits-cnn` and `bytelm`, are registered the same way by this package
(consortium/workloads/builtin.py). docs/workloads.md shows a complete example.

Loading a workload here imports its module only: a workload must import torch (or
anything heavy) inside its methods, since the coordinator validates specs in processes
that never train.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from consortium.errors import UnknownWorkloadError, WorkloadNotAllowedError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from consortium.provenance.commitment import DataCommitment

ENTRY_POINT_GROUP = "consortium.workloads"
# The workloads a site runs when its settings name none: the built-in ones.
BUILTIN_WORKLOADS = ("digits-cnn", "bytelm")

# A job's `model_options`: numbers, flags and strings (a base model's directory, say).
OptionValue = int | float | str | bool
WorkloadOptions = Mapping[str, OptionValue]


@dataclass(frozen=True)
class RoundBudget:
    """One round of local training as the job spec sets it; a workload uses what fits
    it (a classifier its epochs, a language model its steps and window)."""

    epochs: int
    steps: int
    batch_size: int
    learning_rate: float
    seed: int
    proximal_mu: float = 0.0
    seq_len: int = 64


@dataclass(frozen=True)
class TrainResult:
    examples: int  # what the update is weighted by (and checked against the site's claim)
    loss: float  # the mean training loss of the round
    commitment: DataCommitment  # the site's keyed commitment to the data it trained on


@dataclass(frozen=True)
class EvalResult:
    examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class HeldOut(Protocol):
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of `model` on public held-out data (the coordinator's own)."""
        ...


@runtime_checkable
class Workload(Protocol):
    """What a workload package provides (see the module docstring)."""

    # Datasets it trains on, by the names sites give them; empty: any name.
    datasets: frozenset[str]

    def parameter_count(self, options: WorkloadOptions) -> int:
        """The model's size from options alone (checked at submit, nothing allocated);
        raises ValueError for options the model does not take."""
        ...

    def build_model(self, options: WorkloadOptions) -> nn.Module: ...

    def exchanged(self, model: nn.Module) -> OrderedDict[str, torch.Tensor]:
        """The tensors that travel and are aggregated, by name (detached)."""
        ...

    def load_exchanged(self, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy received tensors into the model; raises ValueError when they do not fit."""
        ...

    def load_site_data(self, data_dir: Path, dataset: str) -> Any:
        """The site's dataset `dataset` from its data dir (raises DataDirError)."""
        ...

    def train(
        self,
        model: nn.Module,
        data: Any,
        budget: RoundBudget,
        device: torch.device,
        commitment_key: bytes,
    ) -> TrainResult: ...

    def evaluate(
        self, model: nn.Module, data: Any, budget: RoundBudget, device: torch.device
    ) -> EvalResult: ...

    def held_out(self, dataset: str, budget: RoundBudget, eval_batches: int) -> HeldOut | None:
        """Public held-out data the coordinator scores each round's model on; None
        when the workload ships none (rounds then carry the sites' metrics only)."""
        ...


@dataclass(frozen=True)
class WorkloadSource:
    """Where a workload came from, as provenance records it."""

    name: str
    distribution: str
    version: str
    module: str
    digest: str  # sha256 over its top-level package's .py files (path and content)

    def describe(self) -> dict[str, str]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "source_digest": self.digest,
        }


def installed_workloads() -> dict[str, importlib.metadata.EntryPoint]:
    """Every workload an installed package registers, by name."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_workload(name: str) -> Workload:
    """The installed workload `name`; raises UnknownWorkloadError naming the known ones,
    or when the registered object lacks a method of the protocol."""
    return _load(name)[0]


@functools.cache
def workload_source(name: str) -> WorkloadSource:
    """Where workload `name` came from. Digested on first use only: sites and spec
    checks load workloads without reading their package's files."""
    entry = _load(name)[1]
    distribution = entry.dist.name if entry.dist is not None else "unknown"
    version = entry.dist.version if entry.dist is not None else "unknown"
    return WorkloadSource(name, distribution, version, entry.module, package_digest(entry.module))


@functools.cache
def _load(name: str) -> tuple[Workload, importlib.metadata.EntryPoint]:
    entry = installed_workloads().get(name)
    if entry is None:
        known = ", ".join(sorted(installed_workloads())) or "none"
        raise UnknownWorkloadError(
            f"unknown workload {name!r}; installed: {known} (a workload is a package "
            f"registering an entry point in the {ENTRY_POINT_GROUP!r} group)"
        )
    loaded = entry.load()
    workload = loaded() if isinstance(loaded, type) else loaded
    if not isinstance(workload, Workload):
        missing = [m for m in _PROTOCOL_MEMBERS if not hasattr(workload, m)]
        raise UnknownWorkloadError(
            f"workload {name!r} ({entry.value}) does not implement the workload protocol: "
            f"missing {', '.join(missing)}"
        )
    return workload, entry


_PROTOCOL_MEMBERS = (
    "datasets",
    "parameter_count",
    "build_model",
    "exchanged",
    "load_exchanged",
    "load_site_data",
    "train",
    "evaluate",
    "held_out",
)


def package_digest(module: str) -> str:
    """sha256 over the .py files of `module`'s top-level package (relative path and
    content, sorted), wherever it is installed: the same code gives the same digest in
    a wheel install, an editable one or a directory on PYTHONPATH."""
    top = module.split(".", maxsplit=1)[0]
    spec = importlib.util.find_spec(top)
    if spec is None or (spec.origin is None and not spec.submodule_search_locations):
        raise UnknownWorkloadError(f"cannot find the package {top!r} to digest")
    if spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
        files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
        base = root.parent
    else:
        assert spec.origin is not None
        files = [Path(spec.origin)]
        base = files[0].parent
    hasher = hashlib.sha256()
    for path in files:
        hasher.update(str(path.relative_to(base)).encode() + b"\0")
        hasher.update(hashlib.sha256(path.read_bytes()).digest())
    return hasher.hexdigest()


def allowed_workloads(setting: str) -> list[str]:
    """A site's allowed workloads from its node config (comma-separated)."""
    return [name.strip() for name in setting.split(",") if name.strip()]


def check_allowed(name: str, allowed: list[str], institution: str) -> None:
    """Raises WorkloadNotAllowedError unless the site lists `name`."""
    if name not in allowed:
        raise WorkloadNotAllowedError(
            f"site {institution or '(unnamed)'} does not run workload {name!r}: it allows "
            f"{', '.join(allowed) or 'none'}; to run it, install its package at the site and "
            "add it to `workloads` in the site's client settings"
        )
