"""Pure, deterministic decisions of one outer step: which shards, which seeds.

Both depend only on the job seed, the outer step index and a worker's *position* (its
rank among the step's workers sorted by id), never on which machine holds the
position, so a replay on other nodes with the same number of workers gives the same
pseudo-gradients.
"""

from __future__ import annotations

import hashlib


def assign_shards(num_shards: int, num_workers: int, step: int) -> list[tuple[int, ...]]:
    """Shards for each position: shard ``j`` goes to position ``(j + step) % num_workers``.

    Every shard is used exactly once per outer step and the assignment rotates, so over
    ``num_workers`` steps each position sees every shard. Needs ``num_workers <=
    num_shards`` (the scaling policy never plans more workers than shards).
    """
    if not 1 <= num_workers <= num_shards:
        raise ValueError(f"need 1 <= num_workers ({num_workers}) <= num_shards ({num_shards})")
    assignment: list[list[int]] = [[] for _ in range(num_workers)]
    for shard in range(num_shards):
        assignment[(shard + step) % num_workers].append(shard)
    return [tuple(shards) for shards in assignment]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from SHA-256 of the parts (stable across processes and versions)."""
    text = "/".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1
