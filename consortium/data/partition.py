"""Non-IID partitioning of labelled data across sites with a Dirichlet prior.

For every class c, proportions p_c ~ Dirichlet(alpha * 1_k) decide which share
of that class's examples goes to each of the k sites (Hsu et al., 2019). Small
alpha gives skewed label mixes; large alpha approaches IID. Partitions are
disjoint, cover every example, and depend only on (labels, k, alpha, seed).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

MAX_DRAWS = 1000


def dirichlet_partition(
    labels: npt.NDArray[np.int64],
    num_partitions: int,
    alpha: float,
    seed: int,
    min_partition_size: int = 10,
) -> list[npt.NDArray[np.int64]]:
    """Indices into `labels` for each partition, each sorted ascending.

    Redraws (deterministically, from the same generator) until every partition
    holds at least `min_partition_size` examples, so no site is left empty.
    """
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if num_partitions * min_partition_size > len(labels):
        raise ValueError(
            f"{len(labels)} examples cannot give {num_partitions} partitions of at least "
            f"{min_partition_size}"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(MAX_DRAWS):
        parts: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(num_partitions)]
        for c in classes:
            members = np.flatnonzero(labels == c)
            rng.shuffle(members)
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for part, chunk in zip(parts, np.split(members, cuts), strict=True):
                part.append(chunk)
        merged = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(m) for m in merged) >= min_partition_size:
            return merged
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw gave every partition {min_partition_size} "
        f"examples in {MAX_DRAWS} tries; raise alpha or lower the minimum"
    )
