"""Benchmark: exact streaming weighted mean vs Flower's `aggregate` vs a plain memory copy.

    python benchmarks/aggregate.py [--clients 10] [--params 10000000] [--sweep]

All methods see the same float32 inputs, generated before any timing. Each time is the
best of ``--repeats`` rounds that run every method, side by side (wall clock, no
tracing), so a change in machine load affects all methods alike; within a round each
method runs twice back to back and the second run is timed; peak extra memory is measured in a
separate traced run with `tracemalloc` (numpy reports its array allocations to it), so
it counts everything a method allocates, including the result it returns. Ratios are
time / reference time (above 1 means slower than the reference). "Model
sizes" divide that by the bytes of one float32 model. The memcopy row copies every
update into one buffer with `np.copyto`: the memory-bandwidth floor for touching the
inputs once. The "state round trips" row reads and writes a 12-byte-per-parameter state
once per update with trivial arithmetic: the floor for `add` called once per update,
exact or not. `add_many` adds all updates block by block (the state stays in cache) on a
thread per core; the "one thread" row shows how much of its speed is the second core.
Flower's `aggregate` is single-threaded numpy. Scratch that numba allocates (about 110 KiB
per thread) is not seen by `tracemalloc`.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import platform
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.server.strategy.aggregate import aggregate as flower_aggregate

from consortium.aggregation import VALUE_LIMIT, StreamingMean, exact_sum, spec_of, validate_update

Model = dict[str, npt.NDArray[np.float32]]
Method = Callable[[], object]

SPEED_TARGET = 2.0  # at least 2x faster than Flower
MEMORY_TARGET = 3.0  # at most 3 model sizes of extra memory
STREAMING = "exact StreamingMean.add"
BATCHED = "exact StreamingMean.add_many"


def make_updates(clients: int, params: int, seed: int) -> tuple[list[Model], list[int]]:
    """``clients`` updates shaped like a small network: a few big and a few tiny tensors."""
    biases = [64, 64, 64] if params >= 4096 else []
    sizes = [params // 2, params // 4, params // 8]
    sizes += [params - sum(sizes) - sum(biases), *biases]
    rng = np.random.default_rng(seed)
    updates = []
    for _ in range(clients):
        update = {}
        for i, size in enumerate(sizes):
            values = rng.standard_normal(size, dtype=np.float32)
            values *= np.float32(0.01)  # update-like magnitudes
            update[f"layer{i}"] = values
        updates.append(update)
    weights = [int(w) for w in rng.integers(100, 10_000, clients)]
    return updates, weights


def methods(updates: list[Model], weights: list[int]) -> dict[str, Method]:
    spec = spec_of(updates[0])
    names = sorted(spec)

    pairs = list(zip(updates, weights, strict=True))

    def exact_add() -> object:
        mean = StreamingMean(spec, max_norm=1e6)
        for update, weight in pairs:
            mean.add(update, weight)
        return mean.finish()

    def exact_add_many() -> object:
        mean = StreamingMean(spec, max_norm=1e6)
        mean.add_many(pairs)
        return mean.finish()

    def exact_add_many_one_thread() -> object:
        threads = exact_sum._threads
        exact_sum._threads = lambda: 1
        try:
            return exact_add_many()
        finally:
            exact_sum._threads = threads

    def validate_only() -> object:
        for update in updates:
            validate_update(update, spec, max_norm=1e6, value_limit=VALUE_LIMIT)
        return None

    def state_round_trip() -> object:
        # What a streaming accumulator with this state must at least do when updates
        # come one at a time: read and write its 12 bytes per parameter once per update.
        hi = np.zeros(sum(t.size for t in spec.values()), np.int64)
        lo = np.zeros(hi.size, np.int32)
        for _ in updates:
            np.add(hi, 1, out=hi)
            np.add(lo, 1, out=lo)
        return hi, lo

    def flower() -> object:
        results = [([u[n] for n in names], w) for u, w in zip(updates, weights, strict=True)]
        return flower_aggregate(results)

    def memcopy() -> object:
        buffers = {n: np.empty_like(updates[0][n]) for n in names}
        for update in updates:
            for n in names:
                np.copyto(buffers[n], update[n])
        return buffers

    return {
        STREAMING: exact_add,
        BATCHED: exact_add_many,
        "exact add_many, one thread": exact_add_many_one_thread,
        "validate_update alone": validate_only,
        "12 B/param state round trips": state_round_trip,
        "flower aggregate": flower,
        "memcopy (bandwidth floor)": memcopy,
    }


def best_times(methods: dict[str, Method], repeats: int) -> dict[str, float]:
    """Best wall time of each method; rounds are interleaved so load changes hit all alike."""
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(repeats):
        for label, method in methods.items():
            # Back to back, timing the second run: the allocator's state (whether big
            # arrays come from the heap or from fresh, page-faulting mmaps) is then the
            # method's own, not what the method before it left behind.
            method()
            gc.collect()
            start = time.perf_counter()
            method()
            best[label] = min(best[label], time.perf_counter() - start)
    return best


def peak_extra_bytes(method: Method) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        result = method()
        _, peak = tracemalloc.get_traced_memory()
        del result
    finally:
        tracemalloc.stop()
    return peak - base


def as_list(result: Any, names: list[str]) -> list[npt.NDArray[Any]]:
    return [result[n] for n in names] if isinstance(result, dict) else list(result)


def accuracy_and_order(updates: list[Model], weights: list[int]) -> list[str]:
    """Max error against a float64 reference, in float32 ulps, and order sensitivity."""
    names = sorted(updates[0])
    reference = []
    for n in names:
        total = np.zeros(updates[0][n].size, np.float64)
        for update, weight in zip(updates, weights, strict=True):
            total += update[n].astype(np.float64) * weight
        reference.append(total / sum(weights))
    lines = []
    for label, key in (("exact", STREAMING), ("flower", "flower aggregate")):
        forward = as_list(methods(updates, weights)[key](), names)
        backward = as_list(methods(updates[::-1], weights[::-1])[key](), names)
        ulps, rounded, count = 0.0, 0, 0
        for got, ref in zip(forward, reference, strict=True):
            nearest = ref.astype(np.float32)
            ulps = max(ulps, float(np.max(np.abs(got - ref) / np.spacing(np.abs(nearest)))))
            rounded += int(np.count_nonzero(got == nearest))
            count += got.size
        same = _digest(forward) == _digest(backward)
        lines.append(
            f"  {label:6s}: {100 * rounded / count:7.3f}% of values equal float32(float64 "
            f"reference), max error {ulps:.3g} ulp; reversed arrival order gives "
            f"{'identical' if same else 'DIFFERENT'} bytes"
        )
    return lines


def _digest(arrays: list[npt.NDArray[Any]]) -> str:
    sha = hashlib.sha256()
    for array in arrays:
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()


def run(clients: int, params: int, repeats: int, seed: int) -> None:
    updates, weights = make_updates(clients, params, seed)
    model_bytes = params * 4
    candidates = methods(updates, weights)
    small, small_weights = make_updates(2, 1000, seed)
    for method in methods(small, small_weights).values():
        method()  # compile (or load from numba's cache) before timing
    best = best_times(candidates, repeats)
    timings = {label: (best[label], peak_extra_bytes(m)) for label, m in candidates.items()}
    flower_s = timings["flower aggregate"][0]
    copy_s = timings["memcopy (bandwidth floor)"][0]
    print(f"\n{clients} clients x {params:,} float32 parameters (best of {repeats})")
    header = f"{'method':33s} {'seconds':>8s} {'t/t_flower':>10s} {'t/t_memcopy':>11s}"
    print(header + f" {'peak extra MiB':>15s} {'model sizes':>12s}")
    for label, (seconds, peak) in timings.items():
        print(
            f"{label:33s} {seconds:8.3f} {seconds / flower_s:9.2f}x {seconds / copy_s:10.2f}x"
            f" {peak / 2**20:15.1f} {peak / model_bytes:12.2f}"
        )
    state = StreamingMean(spec_of(updates[0])).nbytes  # the accumulator's limbs
    for label in (STREAMING, BATCHED):
        exact_s, exact_peak = timings[label]
        speedup = flower_s / exact_s
        faster = f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x SLOWER"
        speed_ok = "met" if speedup >= SPEED_TARGET else "NOT met"
        # The state is what grows with the model; block scratch is a fixed few hundred KiB.
        memory_ok = "met" if state / model_bytes <= MEMORY_TARGET else "NOT met"
        print(
            f"verdict: {label} is {faster} than Flower (target >= {SPEED_TARGET:.0f}x "
            f"faster: {speed_ok}); extra memory {exact_peak / model_bytes:.3f} model sizes = "
            f"state {state / model_bytes:.2f} + {(exact_peak - state) / 2**20:.2f} MiB of "
            f"fixed scratch (target <= {MEMORY_TARGET:.0f} model sizes: {memory_ok})"
        )
    print("\n".join(accuracy_and_order(updates, weights)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--sweep", action="store_true", help="also run 1e5, 1e6 and 1e7 params")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        f"numpy {np.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"load average {os.getloadavg()[0]:.2f} (timings are wall clock: other load skews them)"
    )
    sizes = [args.params]
    if args.sweep:
        sizes = sorted({100_000, 1_000_000, 10_000_000, args.params})
    for params in sizes:
        run(args.clients, params, args.repeats, args.seed)


if __name__ == "__main__":
    main()
