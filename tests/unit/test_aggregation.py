"""Aggregation core: validation, exact order-independent weighted mean, robust rules."""

from __future__ import annotations

import hashlib
import math
import pickle
import random
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from consortium.aggregation import (
    MAX_TOTAL_WEIGHT,
    MAX_WEIGHT,
    QUANTUM,
    VALUE_LIMIT,
    EmptyAggregateError,
    RejectReason,
    StreamingMean,
    UpdateRejected,
    coordinate_median,
    exact_sum,
    krum,
    layout,
    spec_of,
    trimmed_mean,
    validate_update,
)
from consortium.aggregation.validate import tensor_stats

Model = dict[str, npt.NDArray[Any]]

REFERENCE: Model = {
    "conv.weight": np.zeros((4, 3, 3, 3), np.float32),
    "conv.bias": np.zeros(4, np.float32),
    "fc.weight": np.zeros((10, 64), np.float32),
    "head.scale": np.zeros(7, np.float64),
}


def random_update(rng: np.random.Generator, reference: Model = REFERENCE) -> Model:
    """Values spread over many binades (1e-12 .. 1e2) so float sums would be order-sensitive."""
    update = {}
    for name, tensor in reference.items():
        scale = 10.0 ** rng.integers(-12, 3, tensor.shape)
        update[name] = (rng.standard_normal(tensor.shape) * scale).astype(tensor.dtype)
    return update


def random_updates(seed: int, count: int = 8) -> list[tuple[Model, int]]:
    rng = np.random.default_rng(seed)
    return [(random_update(rng), int(rng.integers(1, 100_000))) for _ in range(count)]


def result_digest(result: Model) -> str:
    sha = hashlib.sha256()
    for name in sorted(result):
        sha.update(result[name].tobytes())
    return sha.hexdigest()


def aggregate(updates: list[tuple[Model, int]], **kwargs: Any) -> StreamingMean:
    mean = StreamingMean(REFERENCE, **kwargs)
    for update, weight in updates:
        mean.add(update, weight)
    return mean


def exact_mean(updates: list[tuple[Model, int]], name: str) -> npt.NDArray[np.float64]:
    """Correctly rounded float64 sum of the (exact in float64) products, then one division."""
    total_weight = sum(weight for _, weight in updates)
    columns = [u[name].astype(np.float64).reshape(-1) * w for u, w in updates]
    sums = [math.fsum(values) for values in zip(*columns, strict=True)]
    return np.array(sums, np.float64) / total_weight


def test_streaming_mean_identical_digest_for_100_permutations() -> None:
    updates = random_updates(seed=1)
    states, results = set(), set()
    for seed in range(100):
        order = updates.copy()
        random.Random(seed).shuffle(order)
        mean = aggregate(order)
        states.add(mean.digest())
        results.add(result_digest(mean.result()))
    assert len(states) == 1
    assert len(results) == 1


def test_streaming_mean_within_documented_bound_of_exact_mean() -> None:
    updates = random_updates(seed=2)
    result = aggregate(updates).result()
    for name, tensor in REFERENCE.items():
        exact = exact_mean(updates, name)
        got = result[name].reshape(-1).astype(np.float64)
        ulp = np.spacing(np.abs(exact).astype(tensor.dtype)).astype(np.float64)
        # Documented: (1/2 + 2**-26) ulp + 2**-44; the reference itself is within 2**-52.
        bound = ulp * (0.5 + 2.0**-26) + QUANTUM / 2 + np.abs(exact) * 2.0**-52
        if tensor.dtype == np.float64:  # float64 outputs: relative 2**-50 + 2**-43
            bound = np.abs(exact) * (2.0**-50 + 2.0**-52) + QUANTUM
        assert np.all(np.abs(got - exact) <= bound), name


def test_streaming_mean_exact_when_inputs_and_mean_representable() -> None:
    reference = {"w": np.zeros(3, np.float32)}
    mean = StreamingMean(reference)
    mean.add({"w": np.array([1.5, -(2.0**-36), 65535.99], np.float32)}, 3)
    mean.add({"w": np.array([0.5, -(2.0**-36), 65535.99], np.float32)}, 1)
    expected = np.array([1.25, -(2.0**-36), 65535.99], np.float32)
    np.testing.assert_array_equal(mean.result()["w"], expected)


def test_streaming_mean_extreme_values_and_weights_exact() -> None:
    largest = np.nextafter(np.float32(VALUE_LIMIT), np.float32(0))
    reference = {"w": np.zeros(2, np.float32)}
    mean = StreamingMean(reference)
    for _ in range(3):
        mean.add({"w": np.array([largest, -largest], np.float32)}, MAX_WEIGHT)
    np.testing.assert_array_equal(mean.result()["w"], [largest, -largest])


def test_streaming_mean_handles_scalar_and_empty_tensors() -> None:
    reference: Model = {"scalar": np.zeros((), np.float32), "empty": np.zeros((0, 3))}
    mean = StreamingMean(reference)
    mean.add({"scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 3))}, 1)
    mean.add({"scalar": np.array(-0.5, np.float32), "empty": np.zeros((0, 3))}, 3)
    result = mean.result()
    assert result["scalar"].shape == () and result["scalar"] == np.float32(0.25)
    assert result["empty"].shape == (0, 3) and result["empty"].dtype == np.float64


def quantum_multiples(update: Model) -> Model:
    """The update with every value a multiple of the quantum: float32-representable and
    zero or at least 2**-20 in magnitude (so no weighted term is ever rounded)."""
    out = {}
    for name, values in update.items():
        single = values.astype(np.float32)
        single[np.abs(single) < 2.0**-20] = 0.0
        out[name] = single.astype(values.dtype)
    return out


def test_streaming_mean_weight_three_equals_three_unit_adds_bit_for_bit() -> None:
    (update, _), (other, _) = random_updates(seed=3, count=2)
    update, other = quantum_multiples(update), quantum_multiples(other)
    once = aggregate([(update, 3), (other, 2)])
    thrice = aggregate([(update, 1), (other, 2), (update, 1), (update, 1)])
    assert once.digest() == thrice.digest()
    assert result_digest(once.result()) == result_digest(thrice.result())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_each_weighted_term_is_rounded_once_to_the_quantum_half_to_even(dtype: Any) -> None:
    quantum = Fraction(QUANTUM)
    # Terms of 0.5, 1.5 and -1.5 quanta (ties), and values that are no tie.
    values = np.array([QUANTUM / 2, QUANTUM / 2, -QUANTUM / 2, 0.3 * QUANTUM, 1e-20], dtype)
    weights = [1, 3, 3, 7, 5]
    reference = {"w": np.zeros(values.size, dtype)}
    for column, weight in enumerate(weights):
        mean = StreamingMean(reference)
        mean.add({"w": values}, weight)
        # Python rounds a Fraction half to even.
        counts = round(Fraction(float(values[column])) * weight / quantum)
        expected = float(counts * quantum / weight)
        assert mean.result()["w"][column] == dtype(expected), column
    assert [round(Fraction(float(v)) * w / quantum) for v, w in zip(values, weights, strict=True)][
        :3
    ] == [
        0,
        2,
        -2,
    ]
    # Three unit adds round three times: 3 * round(0.5 quanta) = 0, unlike weight 3.
    thrice = StreamingMean(reference)
    for _ in range(3):
        thrice.add({"w": values}, 1)
    assert thrice.result()["w"][1] == 0.0


def test_streaming_mean_accepts_numpy_integer_weight() -> None:
    updates = random_updates(seed=4, count=2)
    plain = aggregate(updates)
    numpy_weights = aggregate([(u, np.int32(w)) for u, w in updates])  # type: ignore[misc]
    assert plain.digest() == numpy_weights.digest()


def test_streaming_mean_same_digest_for_noncontiguous_input() -> None:
    update, weight = random_updates(seed=5, count=1)[0]
    fortran = {name: np.asfortranarray(value) for name, value in update.items()}
    assert not fortran["fc.weight"].flags.c_contiguous
    assert aggregate([(update, weight)]).digest() == aggregate([(fortran, weight)]).digest()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_streaming_mean_same_bits_for_any_batching_and_thread_count(
    monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    # Tensors spanning several superblocks, with ragged tails, so they split across threads.
    reference: Model = {
        "big": np.zeros(2 * layout.SUPERBLOCK + 3 * layout.BLOCK + 5, np.float32),
        "big64": np.zeros(layout.SUPERBLOCK + 1, np.float64),
        "small": np.zeros(3, np.float32),
    }
    rng = np.random.default_rng(6)
    updates = [(random_update(rng, reference), int(rng.integers(1, 1000))) for _ in range(7)]
    one_by_one = StreamingMean(reference)
    for update, weight in updates:
        one_by_one.add(update, weight)
    monkeypatch.setattr(exact_sum, "_threads", lambda: threads)
    for seed in range(3):
        order = updates.copy()
        random.Random(seed).shuffle(order)
        batched = StreamingMean(reference)
        batched.add_many(order[: seed + 1])
        batched.add_many(order[seed + 1 :])
        assert batched.digest() == one_by_one.digest()
        assert result_digest(batched.result()) == result_digest(one_by_one.result())
    total = sum(weight for _, weight in updates)
    for name in reference:
        close = sum(u[name].astype(np.float64) * w for u, w in updates) / total
        result = one_by_one.result()[name]
        ulp = np.spacing(np.abs(result)).astype(np.float64)  # in the tensor's own dtype
        bound = ulp + QUANTUM + np.abs(close) * 2.0**-48  # float64 reference: 7 roundings
        assert np.all(np.abs(result.astype(np.float64) - close) <= bound), name


def test_rejected_updates_in_a_batch_are_taken_out_bit_for_bit() -> None:
    reference: Model = {"big": np.zeros(2 * layout.BLOCK + 7, np.float32)}
    rng = np.random.default_rng(16)
    good = [(random_update(rng, reference), int(rng.integers(1, 1000))) for _ in range(3)]
    nan, huge, large = (random_update(rng, reference) for _ in range(3))
    nan["big"][-1] = math.nan  # in the last block, after earlier blocks were added
    huge["big"][layout.BLOCK] = VALUE_LIMIT
    large["big"][:] = 2e5 / math.sqrt(large["big"].size)  # only its norm is wrong: 2e5 > 1e5
    batched = StreamingMean(reference, max_norm=1e5)
    rejected = batched.add_many([good[0], (nan, 5), good[1], (huge, 5), (large, 9), good[2]])
    reasons = [(i, e.reason) for i, e in rejected]
    assert reasons == [
        (1, RejectReason.NON_FINITE),
        (3, RejectReason.RANGE),
        (4, RejectReason.NORM),
    ]
    clean = StreamingMean(reference, max_norm=1e5)
    clean.add_many(good)
    assert batched.digest() == clean.digest()
    assert (batched.count, batched.total_weight) == (3, sum(w for _, w in good))


def test_validate_update_and_accumulator_compute_the_same_norm_bit_for_bit() -> None:
    reference: Model = {
        "f32": np.zeros(layout.SUPERBLOCK + 2 * layout.BLOCK + 3, np.float32),
        "f64": np.zeros(3 * layout.BLOCK + 1, np.float64),
    }
    update = random_update(np.random.default_rng(19), reference)
    accumulated = exact_sum.ExactSum(spec_of(reference)).add_many([(update, 7)])[0]
    for name in reference:
        alone = tensor_stats(update[name])
        np.testing.assert_array_equal(accumulated[name].superblock_sumsq, alone.superblock_sumsq)
        assert accumulated[name].outside == alone.outside == 0
    norm = math.sqrt(math.fsum(float(np.sum(u.astype(np.float64) ** 2)) for u in update.values()))
    validate_update(update, reference, max_norm=norm * (1 + 1e-12))
    with pytest.raises(UpdateRejected, match="norm"):
        validate_update(update, reference, max_norm=norm * (1 - 1e-12))


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_thread_shares_cover_every_superblock_once_in_balanced_runs(
    monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    sizes = {"a": 5 * layout.SUPERBLOCK + 17, "b": 3, "c": 2 * layout.SUPERBLOCK, "d": 0}
    spec = spec_of({name: np.zeros(size, np.float32) for name, size in sizes.items()})
    monkeypatch.setattr(exact_sum, "_threads", lambda: threads)
    shares = exact_sum._shares(spec)
    covered = [
        (name, s) for share in shares for name, first, stop in share for s in range(first, stop)
    ]
    expected = [
        (name, s) for name, size in sizes.items() for s in range(-(-size // layout.SUPERBLOCK))
    ]
    assert covered == expected  # contiguous, in model order, each superblock once
    assert 1 <= len(shares) <= threads
    work = [
        sum(
            min(layout.SUPERBLOCK, sizes[n] - s * layout.SUPERBLOCK)
            for n, first, stop in share
            for s in range(first, stop)
        )
        for share in shares
    ]
    assert max(work) - min(work) <= layout.SUPERBLOCK  # balanced to one superblock
    small = spec_of({"a": np.zeros(1000, np.float32), "b": np.zeros(10, np.float32)})
    assert exact_sum._shares(small) == [[("a", 0, 1), ("b", 0, 1)]]  # not worth a thread


def test_finish_returns_the_mean_in_the_accumulators_memory_and_ends_the_stream() -> None:
    updates = random_updates(seed=17, count=4)
    mean = aggregate(updates)
    expected = mean.result()
    limbs = (mean._sum._hi, mean._sum._lo)
    finished = mean.finish()
    for name, array in finished.items():
        np.testing.assert_array_equal(array, expected[name])
        assert array.dtype == expected[name].dtype
        assert array.size == 0 or any(np.shares_memory(array, limb) for limb in limbs)
    with pytest.raises(RuntimeError, match="finished"):
        mean.add(*updates[0])


def _set(name: str, index: tuple[int, ...], value: float) -> Callable[[Model], Model]:
    def mutate(update: Model) -> Model:
        update[name][index] = value
        return update

    return mutate


def _replace(name: str, value: Any) -> Callable[[Model], Model]:
    def mutate(update: Model) -> Model:
        update[name] = value
        return update

    return mutate


def _drop(name: str) -> Callable[[Model], Model]:
    def mutate(update: Model) -> Model:
        del update[name]
        return update

    return mutate


INVALID_UPDATES = {
    "nan": (_set("fc.weight", (3, 5), math.nan), RejectReason.NON_FINITE, "fc.weight"),
    "inf": (_set("conv.bias", (1,), math.inf), RejectReason.NON_FINITE, "conv.bias"),
    "neg_inf": (_set("head.scale", (6,), -math.inf), RejectReason.NON_FINITE, "head.scale"),
    "wrong_shape": (
        _replace("fc.weight", np.zeros((64, 10), np.float32)),
        RejectReason.SHAPE,
        "fc.weight",
    ),
    "wrong_dtype": (
        _replace("conv.bias", np.zeros(4, np.float64)),
        RejectReason.DTYPE,
        "conv.bias",
    ),
    "not_an_array": (_replace("conv.bias", [0.0] * 4), RejectReason.DTYPE, "conv.bias"),
    "missing_name": (_drop("conv.bias"), RejectReason.NAMES, "conv.bias"),
    "extra_name": (
        _replace("extra.bias", np.zeros(2, np.float32)),
        RejectReason.NAMES,
        "extra.bias",
    ),
    "out_of_range": (_set("conv.weight", (0, 0, 0, 0), -VALUE_LIMIT), RejectReason.RANGE, None),
    "norm_over_bound": (_set("conv.bias", (0,), 1e4), RejectReason.NORM, None),
}


@pytest.mark.parametrize("case", sorted(INVALID_UPDATES))
def test_add_rejects_invalid_update_and_leaves_state_unchanged(case: str) -> None:
    mutate, reason, tensor = INVALID_UPDATES[case]
    updates = random_updates(seed=7, count=3)
    mean = aggregate(updates[:2], max_norm=5000.0)
    before, result_before = mean.digest(), result_digest(mean.result())
    bad = mutate({name: value.copy() for name, value in updates[2][0].items()})
    with pytest.raises(UpdateRejected) as raised:
        mean.add(bad, 5)
    assert raised.value.reason == reason
    assert tensor is None or tensor in str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert mean.digest() == before
    assert result_digest(mean.result()) == result_before
    assert mean.count == 2


@pytest.mark.parametrize("weight", [0, -1, True, 2.0, "3", MAX_WEIGHT + 1])
def test_add_rejects_bad_weight_and_leaves_state_unchanged(weight: Any) -> None:
    updates = random_updates(seed=8, count=2)
    mean = aggregate(updates[:1])
    before = mean.digest()
    with pytest.raises(UpdateRejected) as raised:
        mean.add(updates[1][0], weight)
    assert raised.value.reason == RejectReason.WEIGHT
    assert mean.digest() == before


def test_add_rejects_weight_beyond_total_capacity() -> None:
    mean = StreamingMean({"w": np.zeros(1, np.float32)})
    update = {"w": np.array([0.1], np.float32)}
    for _ in range(MAX_TOTAL_WEIGHT // MAX_WEIGHT):
        mean.add(update, MAX_WEIGHT)
    before = mean.digest()
    with pytest.raises(UpdateRejected) as raised:
        mean.add(update, 1)
    assert raised.value.reason == RejectReason.WEIGHT
    assert mean.digest() == before
    np.testing.assert_array_equal(mean.result()["w"], update["w"])


def test_add_many_matches_add_loop_and_reports_rejections() -> None:
    updates = random_updates(seed=18, count=40)  # more than one batch
    bad_values = {name: value.copy() for name, value in updates[5][0].items()}
    bad_values["fc.weight"][0, 0] = math.nan
    pairs = [*updates[:5], (bad_values, 7), *updates[5:], (updates[0][0], 0)]
    batched = StreamingMean(REFERENCE)
    rejected = batched.add_many(pairs)
    assert [(i, e.reason) for i, e in rejected] == [
        (5, RejectReason.NON_FINITE),
        (len(pairs) - 1, RejectReason.WEIGHT),
    ]
    looped = aggregate(updates)
    assert batched.count == looped.count == 40
    assert batched.digest() == looped.digest()
    assert result_digest(batched.result()) == result_digest(looped.result())


def test_streaming_mean_memory_constant_from_1_to_50_updates() -> None:
    updates = random_updates(seed=9, count=50)
    mean = StreamingMean(REFERENCE)
    mean.add(*updates[0])
    after_one = mean.nbytes
    for update, weight in updates[1:]:
        mean.add(update, weight)
    model_bytes = sum(np.zeros(t.shape, np.float32).nbytes for t in REFERENCE.values())
    assert mean.nbytes == after_one
    # An int64 and an int32 limb per parameter: 3 float32 model sizes.
    assert mean.nbytes == 3 * model_bytes


def test_streaming_mean_result_repeatable_and_stream_continues() -> None:
    updates = random_updates(seed=10, count=3)
    mean = aggregate(updates[:2])
    first = result_digest(mean.result())
    assert result_digest(mean.result()) == first
    mean.add(*updates[2])
    assert result_digest(mean.result()) == result_digest(aggregate(updates).result())


def test_streaming_mean_result_raises_when_empty() -> None:
    with pytest.raises(EmptyAggregateError):
        StreamingMean(REFERENCE).result()


def test_streaming_mean_rejects_integer_reference() -> None:
    with pytest.raises(TypeError, match="int64"):
        StreamingMean({"steps": np.zeros(1, np.int64)})


def test_validate_update_accepts_valid_update() -> None:
    update = random_updates(seed=11, count=1)[0][0]
    validate_update(update, REFERENCE, max_norm=None)
    validate_update(update, spec_of(REFERENCE), max_norm=1e6, value_limit=VALUE_LIMIT)
    assert spec_of(update) == spec_of(REFERENCE)


def test_update_rejected_survives_pickling() -> None:
    error = UpdateRejected(RejectReason.SHAPE, "update rejected (shape): ...", tensor="fc.weight")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.tensor, str(copy)) == (error.reason, error.tensor, str(error))


def test_validate_update_rejects_norm_just_over_bound() -> None:
    update = {"w": np.array([3.0, 4.0], np.float32)}
    validate_update(update, update, max_norm=5.0)
    with pytest.raises(UpdateRejected, match="norm") as raised:
        validate_update(update, update, max_norm=4.999)
    assert raised.value.reason == RejectReason.NORM


def stack_reference(updates: list[Model], name: str) -> npt.NDArray[Any]:
    return np.sort(np.stack([u[name] for u in updates]), axis=0)


def test_trimmed_mean_matches_numpy_reference_and_is_order_independent() -> None:
    updates = [u for u, _ in random_updates(seed=12, count=9)]
    result = trimmed_mean(updates, 0.25)
    for name, tensor in REFERENCE.items():
        middle = stack_reference(updates, name)[2:7]
        expected = (np.sum(middle, axis=0, dtype=np.float64) / 5).astype(tensor.dtype)
        np.testing.assert_array_equal(result[name], expected)
    for seed in range(10):
        order = updates.copy()
        random.Random(seed).shuffle(order)
        assert result_digest(trimmed_mean(order, 0.25)) == result_digest(result)


def test_trimmed_mean_without_trim_equals_plain_mean() -> None:
    updates = [u for u, _ in random_updates(seed=13, count=4)]
    result = trimmed_mean(updates, 0.0)
    for name, tensor in REFERENCE.items():
        plain = np.mean([u[name].astype(np.float64) for u in updates], axis=0)
        np.testing.assert_allclose(result[name], plain.astype(tensor.dtype), rtol=1e-6)


def test_trimmed_mean_rejects_bad_fraction_and_invalid_update() -> None:
    updates = [u for u, _ in random_updates(seed=14, count=4)]
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(updates, 0.5)
    updates[2]["conv.bias"][0] = math.nan
    with pytest.raises(UpdateRejected, match="update #2") as raised:
        trimmed_mean(updates, 0.25)
    assert raised.value.reason == RejectReason.NON_FINITE
    assert raised.value.tensor == "conv.bias"


@pytest.mark.parametrize("count", [7, 8])
def test_coordinate_median_matches_numpy_and_is_order_independent(count: int) -> None:
    updates = [u for u, _ in random_updates(seed=15, count=count)]
    result = coordinate_median(updates)
    for name, tensor in REFERENCE.items():
        stacked = np.stack([u[name].astype(np.float64) for u in updates])
        expected = np.median(stacked, axis=0).astype(tensor.dtype)
        np.testing.assert_array_equal(result[name], expected)
    for seed in range(10):
        order = updates.copy()
        random.Random(seed).shuffle(order)
        assert result_digest(coordinate_median(order)) == result_digest(result)


def test_coordinate_median_signed_zeros_order_independent() -> None:
    zeros = [{"w": np.array([value], np.float32)} for value in (-0.0, 0.0, -0.0)]
    digests = {result_digest(coordinate_median(zeros[i:] + zeros[:i])) for i in range(3)}
    assert digests == {result_digest({"w": np.array([0.0], np.float32)})}


def test_krum_selects_honest_update_order_independently() -> None:
    rng = np.random.default_rng(16)
    center = random_update(rng)
    honest = [
        {k: (v + rng.standard_normal(v.shape) * 1e-3).astype(v.dtype) for k, v in center.items()}
        for _ in range(6)
    ]
    byzantine = [{k: (v + 50.0).astype(v.dtype) for k, v in center.items()} for _ in range(2)]
    updates = honest + byzantine
    chosen = krum(updates, num_byzantine=2)
    # Brute-force reference: scores from float64 distances of the flattened updates.
    flat = [np.concatenate([u[k].astype(np.float64).ravel() for k in sorted(u)]) for u in updates]
    distances = np.array([[np.sum((a - b) ** 2) for b in flat] for a in flat])
    scores = [np.sum(np.sort(np.delete(row, i))[:4]) for i, row in enumerate(distances)]
    expected = updates[int(np.argmin(scores))]
    assert result_digest(chosen) == result_digest(expected)
    assert any(result_digest(chosen) == result_digest(h) for h in honest)
    for seed in range(5):
        order = updates.copy()
        random.Random(seed).shuffle(order)
        assert result_digest(krum(order, num_byzantine=2)) == result_digest(chosen)


def test_krum_rejects_too_few_updates() -> None:
    updates = [u for u, _ in random_updates(seed=17, count=4)]
    with pytest.raises(ValueError, match="2f \\+ 3"):
        krum(updates, num_byzantine=1)


def test_exact_sum_refuses_arrays_that_do_not_match_its_layout() -> None:
    # The compiled loops read updates by address, so sizes are checked before they run.
    total = exact_sum.ExactSum(spec_of({"w": np.zeros(4, np.float32)}))
    for wrong in (np.zeros(3, np.float32), np.zeros(4, np.float64)):
        with pytest.raises(ValueError, match="does not match the layout"):
            total.add_many([({"w": wrong}, 1)])
    assert total.digest() == exact_sum.ExactSum(spec_of({"w": np.zeros(4, np.float32)})).digest()
