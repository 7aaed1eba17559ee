"""Benchmark: the model on the Flower wire, packed (one safetensors Array) vs Flower's
own `ArrayRecord` of one Array per tensor.

    python benchmarks/model_wire.py [--repeats 20]

For each built-in model (and a LoRA-sized adapter set), side by side in one run: the
Flower objects a message's model record is made of (the SuperLink serves each as one
request: `pull_object` at the receiver, `push_object` at the sender), their bytes, and
the time to encode the tensors and decode them again (best of --repeats, both ways
timed together, after one warm-up). The object counts are exact; the times are this
machine's.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from consortium.model_wire import pack_tensors, unpack_tensors
from consortium.models.bytelm import ByteLM
from consortium.models.bytelm_config import ByteLMConfig
from consortium.models.digits_cnn import DigitsCNN

Tensors = dict[str, npt.NDArray[Any]]


def models() -> dict[str, Tensors]:
    rng = np.random.default_rng(0)
    lora = {
        f"layers.{i}.{proj}.lora_{ab}": rng.standard_normal(shape).astype(np.float32)
        for i in range(24)
        for proj in ("q_proj", "v_proj")
        for ab, shape in (("A", (8, 896)), ("B", (896, 8)))
    }

    def params(module: Any) -> Tensors:
        return {name: p.detach().numpy().copy() for name, p in module.named_parameters()}

    return {
        "digits-cnn": params(DigitsCNN()),
        "bytelm (demo)": params(
            ByteLM(ByteLMConfig(n_layer=2, n_head=2, n_embd=64, block_size=64))
        ),
        "bytelm (default)": params(ByteLM(ByteLMConfig())),
        "LoRA r=8, 24 layers": lora,
    }


def flower_record(tensors: Tensors) -> ArrayRecord:
    return ArrayRecord({name: Array(array) for name, array in tensors.items()})


def flower_decode(record: ArrayRecord) -> Tensors:
    return {name: array.numpy() for name, array in record.items()}


def objects_and_bytes(record: ArrayRecord) -> tuple[int, int]:
    """The objects Flower moves for this record and their deflated bytes."""
    objects = get_all_nested_objects(record)
    return len(objects), sum(len(o.deflate()) for o in objects.values())


def best_time(run: Callable[[], object], repeats: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    header = (
        f"{'model':<22}{'tensors':>8}{'objects':>9}{'packed':>8}{'ratio':>7}"
        f"{'MiB':>8}{'MiB packed':>11}{'ms flower':>11}{'ms packed':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, tensors in models().items():
        flower_objects, flower_bytes = objects_and_bytes(flower_record(tensors))
        packed_objects, packed_bytes = objects_and_bytes(pack_tensors(tensors))
        flower_s = best_time(lambda t=tensors: flower_decode(flower_record(t)), args.repeats)
        packed_s = best_time(lambda t=tensors: unpack_tensors(pack_tensors(t)), args.repeats)
        print(
            f"{name:<22}{len(tensors):>8}{flower_objects:>9}{packed_objects:>8}"
            f"{flower_objects / packed_objects:>6.1f}x"
            f"{flower_bytes / 2**20:>8.2f}{packed_bytes / 2**20:>11.2f}"
            f"{flower_s * 1e3:>11.2f}{packed_s * 1e3:>11.2f}"
        )
    print(
        "\nobjects: Flower objects per model record (each one SuperLink request at the "
        "sender and one at each receiver); ms: encode + decode, best of "
        f"{args.repeats}."
    )


if __name__ == "__main__":
    main()
