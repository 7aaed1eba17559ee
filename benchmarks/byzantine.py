"""Benchmark: final held-out accuracy on digits per aggregation rule and attack.

    python benchmarks/byzantine.py [--rounds 10] [--sizes 5 10] [--markdown]

For n = 5 and 10 sites (scikit-learn's digits, Dirichlet(1.0) shares, seeded) and f of
them malicious, every aggregation rule the coordinator offers (weighted mean, trimmed
mean with trim fraction f/n, coordinate median, Krum with f) runs the same federated
training: each round, honest sites train the global digits CNN for one local epoch
(`consortium.training.train_local`, as the site's ClientApp does) and the attackers
send what the attack crafts from the honest updates they can see (the strongest case:
they know every honest update). Updates go through the coordinator's own checks
(`validate_update` with the default norm bound the strategy derives from the global
model: `DEFAULT_NORM_RATIO` times its norm); a refused update is left out, as the
strategy leaves it out. The mean weighs updates by their example counts; the robust
rules ignore counts.

Attacks (w: an honest site's weights, g: the global weights, d = w - g):
  sign_flip     g - 4 d               (a reversed, boosted step)
  scaled        g + 10 d              (a boosted step, model replacement style)
  noise         g + N(0, 1)           (Gaussian noise on every weight)
  inflated      g - 4 d, claiming 20x its examples (weighted mean's weakness; admission
                caps a count at what the site declared when it joined, so this site
                declared 20x its data)
  colluding     every attacker sends the same g - 2 mean(d): identical updates are each
                other's nearest neighbours, Krum's blind spot

Prints one row per (n, f, attack) with each rule's final accuracy and its difference to
the same rule without attack. Seeded: the same command prints the same table.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from consortium.aggregation import (
    StreamingMean,
    UpdateRejected,
    coordinate_median,
    krum,
    validate_update,
)
from consortium.aggregation import trimmed_mean as trimmed
from consortium.data.digits import train_test_split
from consortium.data.partition import dirichlet_partition
from consortium.models import build_model, load_parameter_tensors, parameter_tensors
from consortium.training import LocalTrainingConfig, evaluate, train_local
from coordinator.federated.strategy import default_norm_bound

Model = dict[str, npt.NDArray[np.float32]]
SEED = 11
ALPHA = 1.0
RULES = ("mean", "trimmed-mean", "median", "krum")
ATTACKS = ("none", "sign_flip", "scaled", "noise", "inflated", "colluding")


@dataclass(frozen=True)
class Setting:
    sites: int
    malicious: int
    attack: str


def to_numpy(model: torch.nn.Module) -> Model:
    return {k: v.detach().cpu().numpy().copy() for k, v in parameter_tensors(model).items()}


def craft(
    attack: str, global_: Model, honest: list[Model], count: int, rng: np.random.Generator
) -> list[Model]:
    """The attackers' updates for one round."""
    delta = [{k: w[k] - global_[k] for k in global_} for w in honest]
    mean_delta = {k: np.mean([d[k] for d in delta], axis=0) for k in global_}
    crafted: list[Model] = []
    for index in range(count):
        d = delta[index % len(delta)]
        if attack in ("sign_flip", "inflated"):
            update = {k: global_[k] - 4 * d[k] for k in global_}
        elif attack == "scaled":
            update = {k: global_[k] + 10 * d[k] for k in global_}
        elif attack == "noise":
            update = {
                k: global_[k] + rng.standard_normal(global_[k].shape).astype(np.float32)
                for k in global_
            }
        elif attack == "colluding":
            update = {k: global_[k] - 2 * mean_delta[k] for k in global_}
        else:
            raise ValueError(attack)
        crafted.append({k: v.astype(np.float32) for k, v in update.items()})
    return crafted


def aggregate(
    rule: str, updates: list[Model], weights: list[int], global_: Model, malicious: int
) -> Model:
    bound = default_norm_bound(global_)
    kept: list[tuple[Model, int]] = []
    for update, weight in zip(updates, weights, strict=True):
        try:
            validate_update(update, global_, max_norm=bound)
        except UpdateRejected:
            continue
        kept.append((update, weight))
    if not kept:
        return global_
    accepted = [u for u, _ in kept]
    if rule == "mean":
        mean = StreamingMean(global_, max_norm=bound)
        for update, weight in kept:
            mean.add(update, weight)
        return mean.result()
    if rule == "trimmed-mean":
        fraction = min(malicious / len(accepted), 0.49)
        return trimmed(accepted, fraction)
    if rule == "median":
        return coordinate_median(accepted)
    f = min(malicious, (len(accepted) - 3) // 2)
    return krum(accepted, max(f, 0)) if len(accepted) >= 3 else coordinate_median(accepted)


def run(setting: Setting, rule: str, rounds: int) -> float:
    train, test = train_test_split()
    parts = dirichlet_partition(train.y, setting.sites, ALPHA, SEED)
    torch.manual_seed(SEED)
    model = build_model("digits-cnn", {})
    rng = np.random.default_rng(SEED)
    honest_sites = parts[setting.malicious :] if setting.attack != "none" else parts
    attackers = setting.malicious if setting.attack != "none" else 0
    config = LocalTrainingConfig(epochs=1, learning_rate=0.05, batch_size=32, seed=SEED)
    device = torch.device("cpu")
    for round_ in range(rounds):
        global_ = to_numpy(model)
        honest: list[Model] = []
        weights: list[int] = []
        for site, indices in enumerate(honest_sites):
            local = build_model("digits-cnn", {})
            load_parameter_tensors(local, {k: torch.from_numpy(v) for k, v in global_.items()})
            seeded = LocalTrainingConfig(
                epochs=config.epochs,
                learning_rate=config.learning_rate,
                batch_size=config.batch_size,
                seed=SEED + 1000 * round_ + site,
            )
            outcome = train_local(local, train.x[indices], train.y[indices], seeded, device)
            honest.append(to_numpy(local))
            weights.append(outcome.num_examples)
        updates = list(honest)
        if attackers:
            crafted = craft(setting.attack, global_, honest, attackers, rng)
            claimed = [len(parts[i]) for i in range(attackers)]
            if setting.attack == "inflated":
                claimed = [20 * c for c in claimed]
            updates += crafted
            weights += claimed
        new = aggregate(rule, updates, weights, global_, attackers)
        load_parameter_tensors(model, {k: torch.from_numpy(np.asarray(v)) for k, v in new.items()})
    return evaluate(model, test.x, test.y).accuracy


def table(sizes: Sequence[int], rounds: int, progress: Callable[[str], None]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for n in sizes:
        baseline = {rule: run(Setting(n, 0, "none"), rule, rounds) for rule in RULES}
        rows.append([n, 0, "none", *(f"{baseline[r]:.3f}" for r in RULES)])
        progress(f"n={n} no attack: {baseline}")
        for f in (1, 2) if n == 5 else (2, 3):
            for attack in ATTACKS[1:]:
                started = time.perf_counter()
                cells = []
                for rule in RULES:
                    accuracy = run(Setting(n, f, attack), rule, rounds)
                    cells.append(f"{accuracy:.3f} ({accuracy - baseline[rule]:+.3f})")
                rows.append([n, f, attack, *cells])
                progress(f"n={n} f={f} {attack}: {cells} ({time.perf_counter() - started:.0f} s)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = table(args.sizes, args.rounds, lambda line: print(line, flush=True))
    header = ["n", "f", "attack", *RULES]
    print()
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(str(c) for c in row) + " |")
    else:
        print("  ".join(f"{h:>22}" for h in header))
        for row in rows:
            print("  ".join(f"{c!s:>22}" for c in row))
    print(
        f"\n{args.rounds} rounds, seed {SEED}, Dirichlet({ALPHA}); accuracy on the held-out "
        f"split; (+/-) against the same rule without attack; {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
