"""Merkle tree hashing, inclusion proofs and consistency proofs as in RFC 9162.

The provenance log commits to its entries with the Merkle Tree Hash (MTH) of
RFC 9162 (Certificate Transparency v2), section 2.1, using SHA-256:

* a leaf is hashed as ``SHA-256(0x00 || data)`` (:func:`leaf_hash`);
* an interior node as ``SHA-256(0x01 || left || right)`` (:func:`node_hash`);
* the empty tree has root ``SHA-256("")`` (:func:`empty_root`);
* a tree of ``n > 1`` leaves is split at ``k``, the largest power of two smaller
  than ``n``: ``MTH(D[n]) = node_hash(MTH(D[0:k]), MTH(D[k:n]))`` (section 2.1.1).

The distinct leaf/node prefixes make a leaf hash never collide with a node hash
(second-preimage resistance across tree levels).

An inclusion proof (section 2.1.3) shows that a leaf hash sits at a given index
of a tree of a given size; a consistency proof (section 2.1.4) shows that a tree
of ``old_size`` leaves is a prefix of a tree of ``new_size`` leaves, i.e. the log
only ever appended. Proofs are generated with the recursive ``PATH`` and
``SUBPROOF`` definitions and verified with the bit-walking algorithms of
sections 2.1.3.2 and 2.1.4.2, followed step by step. Verification failures raise
:class:`ProofError`.

All functions take *leaf hashes* (32 bytes each), not raw entries: hash entries
with :func:`leaf_hash` first. Consistency from the empty tree (``old_size == 0``)
is rejected: RFC 9162 defines consistency proofs for ``0 < first``, and every tree
trivially extends the empty one, so such a "proof" would prove nothing. Proofs
bind roots, not sizes (a path can fit several sizes): take sizes from signed heads.

Reference: https://www.rfc-editor.org/rfc/rfc9162#section-2.1
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

HASH_SIZE = 32
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"

# MTH of the leaves in the half-open range [start, end).
_SubtreeHash = Callable[[int, int], bytes]


class ProofError(ValueError):
    """An inclusion or consistency proof failed verification."""


def leaf_hash(data: bytes) -> bytes:
    """Return ``SHA-256(0x00 || data)``, the hash of a leaf entry."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return ``SHA-256(0x01 || left || right)``, the hash of an interior node."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def empty_root() -> bytes:
    """Return ``SHA-256("")``, the root of the tree with no leaves."""
    return hashlib.sha256(b"").digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaves(leaf_hashes: Sequence[bytes]) -> bytes:
    """Return MTH over ``leaf_hashes`` exactly as defined in RFC 9162 section 2.1.1."""
    n = len(leaf_hashes)
    if n == 0:
        return empty_root()
    if n == 1:
        return leaf_hashes[0]
    k = _split(n)
    return node_hash(root_from_leaves(leaf_hashes[:k]), root_from_leaves(leaf_hashes[k:]))


def _path(mth: _SubtreeHash, index: int, start: int, end: int) -> list[bytes]:
    """RFC 9162 section 2.1.3.1: PATH(m, D[start:end]) for leaf ``start + index``."""
    n = end - start
    if n <= 1:
        return []
    k = _split(n)
    if index < k:
        return [*_path(mth, index, start, start + k), mth(start + k, end)]
    return [*_path(mth, index - k, start + k, end), mth(start, start + k)]


def _subproof(mth: _SubtreeHash, m: int, start: int, end: int, whole: bool) -> list[bytes]:
    """RFC 9162 section 2.1.4.1: SUBPROOF(m, D[start:end], b)."""
    n = end - start
    if m == n:
        return [] if whole else [mth(start, end)]
    k = _split(n)
    if m <= k:
        return [*_subproof(mth, m, start, start + k, whole), mth(start + k, end)]
    return [*_subproof(mth, m - k, start + k, end, False), mth(start, start + k)]


def _check_range(what: str, value: int, size: int) -> None:
    if not 0 <= value < size:
        raise ValueError(f"{what} {value} is out of range for a tree of size {size}")


def _inclusion_proof(mth: _SubtreeHash, index: int, size: int) -> list[bytes]:
    _check_range("leaf index", index, size)
    return _path(mth, index, 0, size)


def _consistency_proof(mth: _SubtreeHash, old_size: int, new_size: int) -> list[bytes]:
    if old_size <= 0 or old_size > new_size:
        raise ValueError(
            f"consistency proofs need 0 < old_size <= new_size, got {old_size} and {new_size}"
        )
    return _subproof(mth, old_size, 0, new_size, True)


def _leaf_slice_hash(leaf_hashes: Sequence[bytes]) -> _SubtreeHash:
    return lambda start, end: root_from_leaves(leaf_hashes[start:end])


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """Audit path for leaf ``index`` in the tree over all of ``leaf_hashes``."""
    return _inclusion_proof(_leaf_slice_hash(leaf_hashes), index, len(leaf_hashes))


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int, new_size: int) -> list[bytes]:
    """Proof that the first ``old_size`` leaves prefix the first ``new_size`` leaves.

    Requires ``0 < old_size <= new_size <= len(leaf_hashes)``; equal sizes give ``[]``.
    """
    if new_size > len(leaf_hashes):
        raise ValueError(f"new_size {new_size} exceeds the {len(leaf_hashes)} leaves given")
    return _consistency_proof(_leaf_slice_hash(leaf_hashes), old_size, new_size)


def _check_hash(what: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} must be {HASH_SIZE} bytes, got {len(value)}")


def _check_proof_nodes(proof: Sequence[bytes]) -> None:
    for i, node in enumerate(proof):
        _check_hash(f"proof node {i}", node)


def _path_length(fn: int, sn: int) -> int:
    """Nodes the section 2.1.3.2 walk consumes from (fn, sn) until sn reaches 0."""
    inner = (fn ^ sn).bit_length()
    return inner + (fn >> inner).bit_count()


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Verify an inclusion proof (RFC 9162 section 2.1.3.2); raise :class:`ProofError`."""
    # 1. leaf_index >= tree_size fails.
    if index < 0 or index >= tree_size:
        raise ProofError(f"leaf index {index} is out of range for tree size {tree_size}")
    _check_hash("leaf hash", leaf_hash)
    _check_proof_nodes(proof)
    # 2. fn = leaf_index, sn = tree_size - 1.  3. r = hash.
    fn, sn = index, tree_size - 1
    expected = _path_length(fn, sn)
    r = leaf_hash
    # 4. Fold in each value p of inclusion_path.
    for p in proof:
        if sn == 0:
            raise ProofError(f"proof too long: expected {expected} nodes, got {len(proof)}")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:  # until LSB(fn) is set or fn is 0
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    # 5. sn must be 0 and r must equal root_hash.
    if sn != 0:
        raise ProofError(f"proof too short: expected {expected} nodes, got {len(proof)}")
    if r != root:
        raise ProofError(
            f"computed root {r.hex()} does not match expected root {root.hex()} "
            f"for leaf {index} of tree size {tree_size}"
        )


def _consistency_walk(
    old_size: int, new_size: int, old_root: bytes, proof: Sequence[bytes]
) -> tuple[bytes, bytes]:
    """Steps 1-7 of RFC 9162 section 2.1.4.2 for 0 < old_size < new_size; returns (fr, sr)."""
    # 1. An empty consistency_path fails.
    if not proof:
        raise ProofError(f"empty proof for old_size {old_size} < new_size {new_size}")
    _check_proof_nodes(proof)
    path = list(proof)
    # 2. If first is an exact power of 2, prepend first_hash.
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    # 3. fn = first - 1, sn = second - 1.
    fn, sn = old_size - 1, new_size - 1
    # 4. Right-shift both while LSB(fn) is set.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    expected = len(proof) - len(path) + 1 + _path_length(fn, sn)
    # 5. fr and sr start at the first path element.
    fr = sr = path[0]
    # 6. Fold in each subsequent element c.
    for c in path[1:]:
        if sn == 0:
            raise ProofError(f"proof too long: expected {expected} nodes, got {len(proof)}")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:  # until LSB(fn) is set or fn is 0
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # 7. (first part) sn must have reached 0; the caller compares fr and sr.
    if sn != 0:
        raise ProofError(f"proof too short: expected {expected} nodes, got {len(proof)}")
    return fr, sr


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Verify a consistency proof (RFC 9162 section 2.1.4.2); raise :class:`ProofError`."""
    if old_size < 0 or old_size > new_size:
        raise ProofError(f"need 0 <= old_size <= new_size, got {old_size} and {new_size}")
    if old_size == 0:
        raise ProofError("a consistency proof from the empty tree proves nothing (old_size 0)")
    if old_size == new_size:
        if proof:
            raise ProofError(f"old_size == new_size needs an empty proof, got {len(proof)} nodes")
        if old_root != new_root:
            raise ProofError(f"equal tree sizes {old_size} but the roots differ")
        return
    fr, sr = _consistency_walk(old_size, new_size, old_root, proof)
    # 7. fr must equal first_hash and sr must equal second_hash.
    if fr != old_root:
        raise ProofError(f"proof does not reproduce the old root for tree size {old_size}")
    if sr != new_root:
        raise ProofError(f"proof does not reproduce the new root for tree size {new_size}")


class MerkleTree:
    """Append-only Merkle tree over leaf hashes that answers for any past size.

    Besides the leaf hashes it keeps the hash of every complete, aligned subtree
    (``levels[h][i]`` covers leaves ``[i * 2**h, (i + 1) * 2**h)``), so roots and
    proofs for any historical size take O(log n) hashing, and memory stays under
    two hashes per leaf.
    """

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[list[bytes]] = [[]]
        self.extend(leaf_hashes)

    def __len__(self) -> int:
        return len(self._levels[0])

    @property
    def size(self) -> int:
        """Number of leaves appended so far."""
        return len(self._levels[0])

    def append(self, leaf_hash: bytes) -> int:
        """Append one leaf hash (see :func:`leaf_hash`); return its index."""
        if len(leaf_hash) != HASH_SIZE:
            raise ValueError(f"leaf hash must be {HASH_SIZE} bytes, got {len(leaf_hash)}")
        index = len(self._levels[0])
        self._levels[0].append(bytes(leaf_hash))
        level = 0
        while len(self._levels[level]) % 2 == 0:  # a complete subtree of 2**(level+1)
            nodes = self._levels[level]
            if level + 1 == len(self._levels):
                self._levels.append([])
            self._levels[level + 1].append(node_hash(nodes[-2], nodes[-1]))
            level += 1
        return index

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Append several leaf hashes in order."""
        for h in leaf_hashes:
            self.append(h)

    def leaf(self, index: int) -> bytes:
        """The leaf hash at ``index``."""
        _check_range("leaf index", index, self.size)
        return self._levels[0][index]

    def _resolve(self, size: int | None) -> int:
        if size is None:
            return self.size
        if not 0 <= size <= self.size:
            raise ValueError(f"tree size {size} is outside 0..{self.size}")
        return size

    def _mth(self, start: int, end: int) -> bytes:
        """MTH of leaves [start, end); left halves are always cached complete subtrees."""
        n = end - start
        if n & (n - 1) == 0 and start % n == 0:
            return self._levels[n.bit_length() - 1][start // n]
        k = _split(n)
        return node_hash(self._mth(start, start + k), self._mth(start + k, end))

    def root(self, size: int | None = None) -> bytes:
        """Root of the tree over the first ``size`` leaves (default: all)."""
        n = self._resolve(size)
        return empty_root() if n == 0 else self._mth(0, n)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """Audit path for leaf ``index`` in the tree of ``size`` leaves (default: all)."""
        return _inclusion_proof(self._mth, index, self._resolve(size))

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """Proof that the tree of ``old_size`` leaves prefixes the one of ``new_size``."""
        return _consistency_proof(self._mth, old_size, self._resolve(new_size))
