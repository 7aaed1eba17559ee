"""consortium.optim steps exactly as torch.optim does (same kernels, same state), and
its SGD's state dict is torch's, so a checkpoint written before it still loads."""

from __future__ import annotations

import pytest
import torch

from consortium.optim import SGD, AdamW


def model_pair(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    ours = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    theirs = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def backward(model: torch.nn.Module, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(5, 6, generator=generator)
    model(x).pow(2).mean().backward()


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_adamw_matches_torch_bit_for_bit_with_a_changing_learning_rate() -> None:
    ours, theirs = model_pair()
    mine = AdamW(ours.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    reference = torch.optim.AdamW(theirs.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(6):
        lr = 1e-2 * (step + 1) / 6
        mine.lr = lr
        for group in reference.param_groups:
            group["lr"] = lr
        for model in (ours, theirs):
            backward(model, step)
        # A parameter without a gradient is skipped by both and keeps no state.
        ours[0].bias.grad = None
        theirs[0].bias.grad = None
        mine.step()
        reference.step()
        mine.zero_grad()
        reference.zero_grad(set_to_none=True)
        assert_same_parameters(ours, theirs)
    assert all(p.grad is None for p in ours.parameters())
    assert len(mine.state) == len(reference.state) == 3
    for index, param in enumerate(theirs.parameters()):
        if index == 1:
            assert index not in mine.state
            continue
        theirs_state = reference.state[param]
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(mine.state[index][key], theirs_state[key]), key


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_matches_torch_bit_for_bit(momentum: float, nesterov: bool) -> None:
    ours, theirs = model_pair(seed=1)
    mine = SGD(ours.parameters(), lr=0.3, momentum=momentum, nesterov=nesterov)
    reference = torch.optim.SGD(theirs.parameters(), lr=0.3, momentum=momentum, nesterov=nesterov)
    for step in range(4):
        for model in (ours, theirs):
            backward(model, step)
        mine.step()
        reference.step()
        mine.zero_grad()
        reference.zero_grad()
        assert_same_parameters(ours, theirs)
    assert len(mine.momentum_buffers) == (4 if momentum else 0)


def test_sgd_state_round_trips_and_loads_torchs_own_state_dict() -> None:
    ours, theirs = model_pair(seed=2)
    reference = torch.optim.SGD(theirs.parameters(), lr=0.5, momentum=0.8, nesterov=True)
    for step in range(2):
        backward(theirs, step)
        reference.step()
        reference.zero_grad()
    ours.load_state_dict(theirs.state_dict())
    # A checkpoint written by torch.optim.SGD (before consortium.optim) resumes exactly.
    resumed = SGD(ours.parameters(), lr=0.1)
    resumed.load_state_dict(reference.state_dict())
    assert (resumed.lr, resumed.momentum, resumed.nesterov) == (0.5, 0.8, True)
    for model in (ours, theirs):
        backward(model, 7)
    resumed.step()
    reference.step()
    assert_same_parameters(ours, theirs)
    # Our own state dict has torch's layout and loads into torch's optimizer too.
    saved = resumed.state_dict()
    assert saved["state"].keys() == {0, 1, 2, 3}
    torch_again = torch.optim.SGD(theirs.parameters(), lr=0.1)
    torch_again.load_state_dict(saved)
    for index, param in enumerate(theirs.parameters()):
        assert torch.equal(
            torch_again.state[param]["momentum_buffer"], saved["state"][index]["momentum_buffer"]
        )


def test_sgd_refuses_a_state_for_another_model() -> None:
    ours, _ = model_pair()
    saved = SGD(list(ours.parameters())[:2], lr=0.1, momentum=0.9).state_dict()
    with pytest.raises(ValueError, match="holds 2 parameters, the model 4"):
        SGD(ours.parameters(), lr=0.1).load_state_dict(saved)


def test_nesterov_without_momentum_is_refused() -> None:
    with pytest.raises(ValueError, match="Nesterov"):
        SGD([torch.zeros(1, requires_grad=True)], lr=0.1, nesterov=True)
