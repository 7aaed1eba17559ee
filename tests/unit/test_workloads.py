"""Workloads (consortium/workloads): found through the `consortium.workloads` entry-point
group, checked against the protocol, identified by package and source digest, allowed
per site, and named by job specs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from consortium.errors import JobSpecError, UnknownWorkloadError, WorkloadNotAllowedError
from consortium.workloads import (
    BUILTIN_WORKLOADS,
    ENTRY_POINT_GROUP,
    allowed_workloads,
    check_allowed,
    installed_workloads,
    load_workload,
    package_digest,
    workload_source,
)
from coordinator.jobs.spec import parse_job_spec

WORKLOAD_MODULE = """
from collections import OrderedDict


class Complete:
    datasets = frozenset()

    def parameter_count(self, options):
        return 1

    def build_model(self, options):
        raise NotImplementedError

    def exchanged(self, model):
        return OrderedDict()

    def load_exchanged(self, model, tensors):
        pass

    def load_site_data(self, data_dir, dataset):
        return None

    def train(self, model, data, budget, device, commitment_key):
        raise NotImplementedError

    def evaluate(self, model, data, budget, device):
        raise NotImplementedError

    def held_out(self, dataset, budget, eval_batches):
        return None


class NoTraining:
    datasets = frozenset()

    def build_model(self, options):
        raise NotImplementedError


complete = Complete()
"""


def install(root: Path, package: str, entries: dict[str, str], version: str = "1.2.3") -> None:
    """A package with a dist-info, on sys.path: what a wheel install leaves behind."""
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    (root / package / "workload.py").write_text(WORKLOAD_MODULE)
    dist_info = root / f"{package}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n"
    )
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{name} = {ref}" for name, ref in entries.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    package = f"thirdparty_{tmp_path.name.replace('-', '_')}"
    install(
        tmp_path,
        package,
        {
            f"{package}-complete": f"{package}.workload:complete",
            f"{package}-class": f"{package}.workload:Complete",
            f"{package}-incomplete": f"{package}.workload:NoTraining",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / package
    for name in [m for m in sys.modules if m.startswith(package)]:
        del sys.modules[name]


def test_the_builtin_workloads_are_registered_like_any_other() -> None:
    assert set(BUILTIN_WORKLOADS) <= set(installed_workloads())
    for name in BUILTIN_WORKLOADS:
        source = workload_source(name)
        assert source.distribution == "consortium"
        assert source.module == "consortium.workloads.builtin"
        assert source.digest == package_digest("consortium")
    assert load_workload("digits-cnn").datasets == frozenset({"digits"})
    assert load_workload("bytelm").parameter_count({"n_layer": 1}) > 0


def test_an_installed_package_registers_a_workload_by_object_or_class(
    third_party: Path,
) -> None:
    package = third_party.name
    for suffix in ("complete", "class"):
        workload = load_workload(f"{package}-{suffix}")
        assert workload.parameter_count({}) == 1
        source = workload_source(f"{package}-{suffix}")
        assert (source.distribution, source.version) == (package, "1.2.3")
        assert source.describe()["source_digest"] == package_digest(package)


def test_a_workload_missing_a_method_is_refused_naming_it(third_party: Path) -> None:
    with pytest.raises(UnknownWorkloadError, match="missing parameter_count, exchanged"):
        load_workload(f"{third_party.name}-incomplete")


def test_an_unknown_workload_is_refused_listing_the_installed_ones() -> None:
    with pytest.raises(UnknownWorkloadError, match=r"unknown workload 'nope'; installed: .*bytelm"):
        load_workload("nope")


def test_the_source_digest_follows_the_workloads_code(third_party: Path) -> None:
    before = package_digest(third_party.name)
    module = third_party / "workload.py"
    module.write_text(module.read_text() + "\n# changed\n")
    assert package_digest(third_party.name) != before


def test_a_site_runs_only_the_workloads_it_lists() -> None:
    allowed = allowed_workloads("digits-cnn, bytelm,")
    assert allowed == ["digits-cnn", "bytelm"]
    check_allowed("bytelm", allowed, "alpha")
    with pytest.raises(WorkloadNotAllowedError) as refused:
        check_allowed("softmax-digits", allowed, "alpha")
    message = str(refused.value)
    assert "site alpha does not run workload 'softmax-digits'" in message
    assert "it allows digits-cnn, bytelm" in message and "`workloads`" in message


def test_a_spec_names_an_installed_workload_by_either_name(third_party: Path) -> None:
    base = 'name = "x"\ndataset = "digits"\nrounds = 1\n'
    assert parse_job_spec(base + 'workload = "digits-cnn"\n').workload == "digits-cnn"
    assert parse_job_spec(base + 'model = "digits-cnn"\n').workload == "digits-cnn"
    named = parse_job_spec(base + f'workload = "{third_party.name}-complete"\n')
    assert named.workload == f"{third_party.name}-complete"  # any dataset name
    with pytest.raises(JobSpecError, match="field 'workload': unknown workload 'nope'"):
        parse_job_spec(base + 'workload = "nope"\n')
    with pytest.raises(JobSpecError, match="field 'dataset': workload 'bytelm' trains on"):
        parse_job_spec(base + 'workload = "bytelm"\n')
    with pytest.raises(JobSpecError, match="field 'model': unknown field"):
        parse_job_spec(base + 'workload = "digits-cnn"\nmodel = "digits-cnn"\n')
