"""The byte-level transformer: shapes, causality, deterministic init, loss at init."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from consortium.data.stdlib_corpus import load_stdlib_corpus
from consortium.models.bytelm import TINY, VOCAB_SIZE, ByteLM, ByteLMConfig, build_bytelm


def _bytes(batch: int, length: int) -> torch.Tensor:
    corpus = load_stdlib_corpus(2, 2**16, 2**14)
    window = corpus.validation[: batch * length].astype(np.int64)
    return torch.from_numpy(window).view(batch, length)


def test_forward_returns_logits_and_loss_with_expected_shapes() -> None:
    model = build_bytelm(TINY, seed=0)
    data = _bytes(3, 17)
    logits, loss = model(data[:, :-1], data[:, 1:])
    assert logits.shape == (3, 16, VOCAB_SIZE)
    assert loss is not None and loss.shape == ()
    logits_only, no_loss = model(data[:, :-1])
    assert no_loss is None
    assert torch.equal(logits_only, logits)


def test_init_is_identical_for_the_same_seed() -> None:
    first = dict(ByteLM(TINY, seed=7).named_parameters())
    second = dict(ByteLM(TINY, seed=7).named_parameters())
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_init_differs_for_another_seed() -> None:
    first = ByteLM(TINY, seed=1).wte.weight
    second = ByteLM(TINY, seed=2).wte.weight
    assert not torch.equal(first, second)


def test_init_does_not_consume_the_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    ByteLM(TINY, seed=0)
    assert torch.equal(torch.rand(4), expected)


def test_loss_at_init_is_close_to_uniform_over_bytes() -> None:
    data = _bytes(16, 65)
    with torch.no_grad():
        _, loss = ByteLM(TINY, seed=0)(data[:, :-1], data[:, 1:])
    assert loss is not None
    assert abs(float(loss) - math.log(VOCAB_SIZE)) < 0.2


def test_num_parameters_matches_the_module_with_and_without_bias() -> None:
    for config in (TINY, ByteLMConfig(n_layer=3, n_head=4, n_embd=32, block_size=16, bias=False)):
        model = ByteLM(config)
        assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
        assert config.parameter_bytes() == 4 * config.num_parameters()


def test_output_head_is_tied_to_the_input_embedding() -> None:
    model = ByteLM(TINY)
    assert model.lm_head.weight is model.wte.weight
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_future_bytes_do_not_change_earlier_logits() -> None:
    model = ByteLM(TINY, seed=0)
    data = _bytes(1, 32)
    changed = data.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % VOCAB_SIZE
    with torch.no_grad():
        before, _ = model(data)
        after, _ = model(changed)
    assert torch.equal(before[0, :20], after[0, :20])
    assert not torch.equal(before[0, 20:], after[0, 20:])


def test_forward_rejects_sequences_longer_than_block_size() -> None:
    model = ByteLM(ByteLMConfig(n_layer=1, n_head=1, n_embd=8, block_size=4))
    with pytest.raises(ValueError, match="block_size 4"):
        model(torch.zeros(1, 5, dtype=torch.int64))


def test_config_rejects_width_not_divisible_by_heads() -> None:
    with pytest.raises(ValueError, match="multiple of n_head"):
        ByteLMConfig(n_head=3, n_embd=64)
