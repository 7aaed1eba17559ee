"""Commands that never train do not import torch (or Ray); those that do, not its compiler.

Importing torch costs about 3 s of CPU; every `coordinator` command (init, onboard,
jobs submit, provenance verify) and every `coordinator serve` paid it at start-up
until the model catalogue, the pretraining package and the CLI imported training code
only where it runs. A fresh interpreter per case: this process has imported torch.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "ray")

LIGHT_ENTRY_POINTS = [
    "coordinator.cli.main",  # every `coordinator ...` command
    "coordinator.serve",  # `coordinator serve` until a job needs a model
    "coordinator.jobs.spec",  # the spec checks at submit, sizes included
    "coordinator.pretraining",  # the package's public surface loads on use
    "coordinator.pretraining.accounting_files",  # `coordinator accounting`
    "consortium.models",  # the catalogue and size limits
    "client.join",  # `client join` until its first task trains (or its --gpu is checked)
]


# Ray only where a Ray cluster is used (about 0.4 s of CPU per process start): the CLI,
# `coordinator serve` (most consortia in the tests run without Ray) and `client join`.
RAY_FREE_ENTRY_POINTS = ["coordinator.cli.main", "coordinator.serve", "client.join"]


def imported_after(module: str, names: tuple[str, ...] = HEAVY) -> set[str]:
    code = (
        f"import sys, {module}; print(' '.join(name for name in {names!r} if name in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return set(done.stdout.split())


@pytest.mark.parametrize("module", LIGHT_ENTRY_POINTS)
def test_entry_point_does_not_import_torch(module: str) -> None:
    assert "torch" not in imported_after(module)


@pytest.mark.parametrize("module", RAY_FREE_ENTRY_POINTS)
def test_entry_point_does_not_import_ray_either(module: str) -> None:
    assert "ray" not in imported_after(module)


def test_a_fine_tuning_serverapp_loads_neither_ray_nor_the_diloco_site_driver() -> None:
    """Every federated job's ServerApp is a process of its own; DiLoCo at the sites
    (coordinator.federated.pretrain_run) brought Ray and 660 modules more to each."""
    driver = "coordinator.federated.pretrain_run"
    assert imported_after("coordinator.federated.server_app", ("ray", driver)) == set()


def test_building_a_model_still_works_through_the_light_catalogue() -> None:
    code = (
        "from consortium.models import build_model, parameter_tensors; "
        "print(sum(t.numel() for t in parameter_tensors(build_model('digits-cnn')).values()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    from consortium.models import DIGITS_CNN_PARAMETERS

    assert int(done.stdout) == DIGITS_CNN_PARAMETERS


def test_the_training_loops_never_import_torch_dynamo_or_sklearn() -> None:
    """torch.optim's optimizers and torch.use_deterministic_algorithms import
    torch._dynamo (and sympy), and scikit-learn's digits loader imports scipy and pandas:
    seconds of CPU in every process that trains. Deterministic mode, fine-tuning (AdamW,
    gradient clipping), digits training (momentum SGD) and an outer Nesterov step run
    here; the pretraining inner loop uses the same AdamW and determinism switch."""
    code = """
import sys
import numpy as np
import torch
from consortium.lm import FineTuneConfig, fine_tune
from consortium.models import build_model
from consortium.models.bytelm import ByteLM, ByteLMConfig
from consortium.data.digits import train_test_split
from consortium.inner_loop import enable_determinism
from consortium.optim import SGD
from consortium.training import LocalTrainingConfig, train_local

cpu = torch.device("cpu")
enable_determinism("cpu")
assert torch.are_deterministic_algorithms_enabled()
lm = ByteLM(ByteLMConfig(n_layer=1, n_head=1, n_embd=8, block_size=16))
text = np.frombuffer(b"a tiny corpus to fine-tune on, twice over. " * 4, dtype=np.uint8)
tune = FineTuneConfig(steps=2, batch_size=2, seq_len=8, learning_rate=1e-3, seed=0)
fine_tune(lm, text, tune, cpu)
digits, _ = train_test_split()
x, y = digits.x[:4], digits.y[:4]
train_local(build_model("digits-cnn"), x, y, LocalTrainingConfig(1, 0.1, 2, 0), cpu)
outer = SGD(lm.parameters(), lr=0.7, momentum=0.9, nesterov=True)
for p in lm.parameters():
    p.grad = torch.ones_like(p)
outer.step()
print("torch._dynamo" in sys.modules, "sklearn" in sys.modules, "torch" in sys.modules)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "True"]


def test_a_sites_deterministic_step_restores_torch_without_loading_its_compiler() -> None:
    """A site switches torch to deterministic kernels for a federated pretraining step
    and back after it. Torch's public switch imports torch._dynamo and torch._inductor
    the first time (about 1.5 CPU-s), which delayed the reply to a site's first step."""
    code = (
        "import sys, torch\n"
        "from client.federated.diloco_task import torch_settings\n"
        "with torch_settings(True, 'cpu', 1):\n"
        "    assert torch.are_deterministic_algorithms_enabled()\n"
        "assert not torch.are_deterministic_algorithms_enabled()\n"
        "print(' '.join(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == []


@pytest.mark.parametrize(
    "module", ["coordinator.federated.pretrain_run", "coordinator.pretraining.replay"]
)
def test_federated_pretraining_and_replay_train_without_importing_ray(module: str) -> None:
    """A federated pretraining job's ServerApp (DiLoCo at the sites) and `coordinator
    replay` run inner loops and spot checks with no Ray cluster; the worker's config
    alone brought Ray to both (coordinator/pretraining/worker_config.py)."""
    assert "ray" not in imported_after(module)
