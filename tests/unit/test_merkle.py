"""RFC 9162 Merkle tree: published vectors, generated proofs, mutations and properties.

The vectors in data/merkle_vectors.json are data copied from transparency-dev/merkle
(the reference 8-leaf tree plus its inclusion and consistency test cases).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from consortium.provenance.merkle import (
    MerkleTree,
    ProofError,
    consistency_proof,
    empty_root,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "merkle_vectors.json").read_text()
)
LEAF_INPUTS = [bytes.fromhex(x) for x in VECTORS["leaf_inputs"]]
LEAVES = [leaf_hash(x) for x in LEAF_INPUTS]
ROOTS = [bytes.fromhex(x) for x in VECTORS["roots"]]
INCLUSION: list[dict[str, Any]] = VECTORS["inclusion"]
CONSISTENCY: list[dict[str, Any]] = VECTORS["consistency"]
PROPERTY_MAX_SIZE = 20


def _hexes(values: list[str]) -> list[bytes]:
    return [bytes.fromhex(v) for v in values]


def _params(vectors: list[dict[str, Any]], want_error: bool) -> list[Any]:
    return [
        pytest.param(v, id=v["file"].removeprefix("testdata/").removesuffix(".json"))
        for v in vectors
        if v["want_error"] is want_error
    ]


def _is_reference_inclusion(v: dict[str, Any]) -> bool:
    size, index = v["tree_size"], v["leaf_index"]
    return (
        not v["want_error"]
        and size < len(ROOTS)
        and bytes.fromhex(v["root"]) == ROOTS[size]
        and bytes.fromhex(v["leaf_hash"]) == LEAVES[index]
    )


def _is_reference_consistency(v: dict[str, Any]) -> bool:
    old, new = v["old_size"], v["new_size"]
    return (
        not v["want_error"]
        and new < len(ROOTS)
        and bytes.fromhex(v["old_root"]) == ROOTS[old]
        and bytes.fromhex(v["new_root"]) == ROOTS[new]
    )


REFERENCE_INCLUSION = [v for v in INCLUSION if _is_reference_inclusion(v)]
REFERENCE_CONSISTENCY = [v for v in CONSISTENCY if _is_reference_consistency(v)]


def _rejection(verify: Callable[..., None], *args: Any) -> str | None:
    """The ProofError message ``verify(*args)`` raises, or None when it verifies."""
    try:
        verify(*args)
    except ProofError as err:
        return str(err)
    return None


def _flip(value: bytes, bit: int) -> bytes:
    flipped = bytearray(value)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


def _random_leaves(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    return [leaf_hash(rng.randbytes(rng.randrange(0, 64))) for _ in range(count)]


# --- the vector file itself ---------------------------------------------------------------


def test_vectors_source_names_repository_and_paths() -> None:
    source = VECTORS["source"]
    assert source["repository"] == "https://github.com/transparency-dev/merkle"
    assert len(source["commit"]) == 40
    assert set(source["paths"].values()) >= {
        "testdata/inclusion/**/*.json",
        "testdata/consistency/**/*.json",
    }
    assert all(v["file"].startswith("testdata/inclusion/") for v in INCLUSION)
    assert all(v["file"].startswith("testdata/consistency/") for v in CONSISTENCY)


def test_vectors_include_reference_happy_paths_for_both_proof_kinds() -> None:
    # Guards the filters above: the five happy paths over the 8-leaf reference tree.
    assert [(v["leaf_index"], v["tree_size"]) for v in REFERENCE_INCLUSION] == [
        (0, 1),
        (0, 8),
        (5, 8),
        (2, 3),
        (1, 5),
    ]
    assert [(v["old_size"], v["new_size"]) for v in REFERENCE_CONSISTENCY] == [
        (1, 1),
        (1, 8),
        (6, 8),
        (2, 5),
        (6, 7),
    ]


# --- hashing ------------------------------------------------------------------------------


def test_leaf_hash_matches_reference_leaf_hashes() -> None:
    assert [h.hex() for h in LEAVES] == VECTORS["node_hashes"][0]


def test_node_hash_matches_reference_interior_nodes() -> None:
    levels = [_hexes(level) for level in VECTORS["node_hashes"]]
    for height in range(1, len(levels)):
        below = levels[height - 1]
        computed = [node_hash(below[2 * i], below[2 * i + 1]) for i in range(len(below) // 2)]
        assert computed == levels[height]


def test_hashes_use_rfc_prefixes_when_computed() -> None:
    left, right = LEAVES[1], LEAVES[2]
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert node_hash(left, right) == hashlib.sha256(b"\x01" + left + right).digest()
    # Domain separation: the same bytes hashed as a leaf never give the node hash.
    assert leaf_hash(left + right) != node_hash(left, right)


def test_empty_root_is_sha256_of_nothing_when_tree_empty() -> None:
    assert empty_root() == hashlib.sha256(b"").digest() == ROOTS[0]
    assert root_from_leaves([]) == ROOTS[0]
    assert MerkleTree().root() == ROOTS[0]


@pytest.mark.parametrize("size", range(len(ROOTS)))
def test_root_matches_vector_for_each_reference_size(size: int) -> None:
    assert root_from_leaves(LEAVES[:size]) == ROOTS[size]
    assert MerkleTree(LEAVES).root(size) == ROOTS[size]
    assert MerkleTree(LEAVES[:size]).root() == ROOTS[size]


# --- inclusion vectors --------------------------------------------------------------------


def _verify_inclusion_vector(v: dict[str, Any]) -> None:
    verify_inclusion(
        bytes.fromhex(v["leaf_hash"]),
        v["leaf_index"],
        v["tree_size"],
        _hexes(v["proof"]),
        bytes.fromhex(v["root"]),
    )


@pytest.mark.parametrize("vector", _params(INCLUSION, want_error=False))
def test_verify_inclusion_accepts_vector_when_valid(vector: dict[str, Any]) -> None:
    assert _rejection(_verify_inclusion_vector, vector) is None


@pytest.mark.parametrize("vector", _params(INCLUSION, want_error=True))
def test_verify_inclusion_rejects_vector_when_invalid(vector: dict[str, Any]) -> None:
    with pytest.raises(ProofError):
        _verify_inclusion_vector(vector)


@pytest.mark.parametrize("vector", _params(REFERENCE_INCLUSION, want_error=False))
def test_inclusion_proof_equals_vector_for_reference_tree(vector: dict[str, Any]) -> None:
    index, size, expected = vector["leaf_index"], vector["tree_size"], _hexes(vector["proof"])
    assert inclusion_proof(LEAVES[:size], index) == expected
    assert MerkleTree(LEAVES).inclusion_proof(index, size) == expected


# --- consistency vectors ------------------------------------------------------------------


def _verify_consistency_vector(v: dict[str, Any]) -> None:
    verify_consistency(
        v["old_size"],
        v["new_size"],
        bytes.fromhex(v["old_root"]),
        bytes.fromhex(v["new_root"]),
        _hexes(v["proof"]),
    )


@pytest.mark.parametrize("vector", _params(CONSISTENCY, want_error=False))
def test_verify_consistency_accepts_vector_when_valid(vector: dict[str, Any]) -> None:
    assert _rejection(_verify_consistency_vector, vector) is None


@pytest.mark.parametrize("vector", _params(CONSISTENCY, want_error=True))
def test_verify_consistency_rejects_vector_when_invalid(vector: dict[str, Any]) -> None:
    with pytest.raises(ProofError):
        _verify_consistency_vector(vector)


@pytest.mark.parametrize("vector", _params(REFERENCE_CONSISTENCY, want_error=False))
def test_consistency_proof_equals_vector_for_reference_tree(vector: dict[str, Any]) -> None:
    old, new, expected = vector["old_size"], vector["new_size"], _hexes(vector["proof"])
    assert consistency_proof(LEAVES, old, new) == expected
    assert MerkleTree(LEAVES).consistency_proof(old, new) == expected


# --- mutations of a valid inclusion proof -------------------------------------------------

TREE = MerkleTree(_random_leaves(seed=13, count=13))
INCL_INDEX, INCL_SIZE = 10, 13
INCL_PROOF = TREE.inclusion_proof(INCL_INDEX, INCL_SIZE)
INCL_LEAF, INCL_ROOT = TREE.leaf(INCL_INDEX), TREE.root(INCL_SIZE)
# (leaf, index, size, proof, root)
InclusionArgs = tuple[bytes, int, int, list[bytes], bytes]


def _inclusion_mutations() -> list[Any]:
    base: InclusionArgs = (INCL_LEAF, INCL_INDEX, INCL_SIZE, INCL_PROOF, INCL_ROOT)
    extra = hashlib.sha256(b"extra").digest()

    def case(case_id: str, **changes: Any) -> Any:
        leaf, index, size, proof, root = base
        args = (
            changes.get("leaf", leaf),
            changes.get("index", index),
            changes.get("size", size),
            changes.get("proof", proof),
            changes.get("root", root),
        )
        return pytest.param(args, id=case_id)

    cases = [case(f"wrong-index-{i}", index=i) for i in (0, 8, 9, 11, 12, 13, -1)]
    cases += [case(f"wrong-size-{s}", size=s) for s in (0, 10, 11, 12, 17, 26)]
    for node in range(len(INCL_PROOF)):
        for bit in (0, 255):
            mutated = list(INCL_PROOF)
            mutated[node] = _flip(mutated[node], bit)
            cases.append(case(f"flipped-bit-{bit}-in-proof-node-{node}", proof=mutated))
    cases += [case(f"flipped-bit-{bit}-in-leaf", leaf=_flip(INCL_LEAF, bit)) for bit in (0, 255)]
    cases += [case(f"flipped-bit-{bit}-in-root", root=_flip(INCL_ROOT, bit)) for bit in (0, 255)]
    cases += [
        case("truncated-last-node", proof=INCL_PROOF[:-1]),
        case("truncated-first-node", proof=INCL_PROOF[1:]),
        case("empty-proof", proof=[]),
        case("extended-with-extra-node", proof=[*INCL_PROOF, extra]),
        case("extended-with-root", proof=[*INCL_PROOF, INCL_ROOT]),
        case("extended-at-front", proof=[extra, *INCL_PROOF]),
        case("short-proof-node", proof=[*INCL_PROOF[:-1], INCL_PROOF[-1][:31]]),
    ]
    return cases


def test_verify_inclusion_accepts_unmutated_base_proof() -> None:
    assert len(INCL_PROOF) == 4
    assert (
        _rejection(verify_inclusion, INCL_LEAF, INCL_INDEX, INCL_SIZE, INCL_PROOF, INCL_ROOT)
        is None
    )


@pytest.mark.parametrize("args", _inclusion_mutations())
def test_verify_inclusion_rejects_proof_when_mutated(args: InclusionArgs) -> None:
    with pytest.raises(ProofError):
        verify_inclusion(*args)


@pytest.mark.parametrize(
    ("proof", "message"),
    [
        (INCL_PROOF[:-1], "proof too short: expected 4 nodes, got 3"),
        ([*INCL_PROOF, INCL_ROOT], "proof too long: expected 4 nodes, got 5"),
    ],
    ids=["truncated", "extended"],
)
def test_verify_inclusion_explains_wrong_length_when_rejected(
    proof: list[bytes], message: str
) -> None:
    with pytest.raises(ProofError, match=message):
        verify_inclusion(INCL_LEAF, INCL_INDEX, INCL_SIZE, proof, INCL_ROOT)


def test_verify_inclusion_accepts_other_size_when_path_shape_is_unchanged() -> None:
    # RFC 9162 inclusion proofs bind the root, not the size: leaf 10's path has the
    # same shape in trees of 13..16 leaves. The size must come from the signed head.
    for size in (14, 15, 16):
        assert (
            _rejection(verify_inclusion, INCL_LEAF, INCL_INDEX, size, INCL_PROOF, INCL_ROOT) is None
        )
        with pytest.raises(ProofError, match="does not match expected root"):
            verify_inclusion(INCL_LEAF, INCL_INDEX, size, INCL_PROOF, TREE.root(12))


# --- mutations of a valid consistency proof -----------------------------------------------

# (old_size, new_size, old_root, new_root, proof)
ConsistencyArgs = tuple[int, int, bytes, bytes, list[bytes]]


def _consistency_mutations(old: int, new: int) -> list[Any]:
    proof = TREE.consistency_proof(old, new)
    base: ConsistencyArgs = (old, new, TREE.root(old), TREE.root(new), proof)
    extra = hashlib.sha256(b"extra").digest()

    def case(case_id: str, **changes: Any) -> Any:
        args = (
            changes.get("old", base[0]),
            changes.get("new", base[1]),
            changes.get("old_root", base[2]),
            changes.get("new_root", base[3]),
            changes.get("proof", base[4]),
        )
        return pytest.param(args, id=f"{old}-to-{new}-{case_id}")

    cases = []
    for node in range(len(proof)):
        for bit in (0, 255):
            mutated = list(proof)
            mutated[node] = _flip(mutated[node], bit)
            cases.append(case(f"flipped-bit-{bit}-in-proof-node-{node}", proof=mutated))
    for bit in (0, 255):
        cases.append(case(f"flipped-bit-{bit}-in-old-root", old_root=_flip(base[2], bit)))
        cases.append(case(f"flipped-bit-{bit}-in-new-root", new_root=_flip(base[3], bit)))
    cases += [
        case("truncated-last-node", proof=proof[:-1]),
        case("truncated-first-node", proof=proof[1:]),
        case("empty-proof", proof=[]),
        case("extended-with-extra-node", proof=[*proof, extra]),
        case("extended-with-new-root", proof=[*proof, base[3]]),
        case("extended-at-front", proof=[base[2], *proof]),
        case("old-size-plus-one", old=old + 1),
        case("old-size-minus-one", old=old - 1),
        case("new-size-doubled", new=new * 2),
        case("new-size-halved", new=max(old, new // 2)),
        case("old-size-greater-than-new-size", old=new, new=old),
        case("old-size-zero", old=0, old_root=empty_root()),
        case("swapped-roots", old_root=base[3], new_root=base[2]),
    ]
    return cases


@pytest.mark.parametrize(("old", "new"), [(5, 13), (4, 13), (7, 8)])
def test_verify_consistency_accepts_unmutated_base_proof(old: int, new: int) -> None:
    proof = TREE.consistency_proof(old, new)
    assert proof
    assert _rejection(verify_consistency, old, new, TREE.root(old), TREE.root(new), proof) is None


@pytest.mark.parametrize(
    "args",
    _consistency_mutations(5, 13) + _consistency_mutations(4, 13) + _consistency_mutations(7, 8),
)
def test_verify_consistency_rejects_proof_when_mutated(args: ConsistencyArgs) -> None:
    with pytest.raises(ProofError):
        verify_consistency(*args)


def test_verify_consistency_accepts_other_new_size_when_path_shape_is_unchanged() -> None:
    # As with inclusion, the proof binds the roots; 5 -> 13 has the same shape as
    # 5 -> 9..16, so the new size must be taken from the signed tree head.
    proof = TREE.consistency_proof(5, 13)
    for new in (12, 14, 16):
        assert _rejection(verify_consistency, 5, new, TREE.root(5), TREE.root(13), proof) is None
        with pytest.raises(ProofError, match="new root"):
            verify_consistency(5, new, TREE.root(5), TREE.root(12), proof)


def test_verify_consistency_rejects_old_size_greater_than_new_size() -> None:
    with pytest.raises(ProofError, match="old_size <= new_size"):
        verify_consistency(8, 5, TREE.root(8), TREE.root(5), TREE.consistency_proof(5, 8))
    with pytest.raises(ValueError, match="old_size <= new_size"):
        TREE.consistency_proof(8, 5)
    with pytest.raises(ValueError, match="old_size <= new_size"):
        consistency_proof(LEAVES, 8, 5)


def test_verify_consistency_accepts_equal_sizes_when_proof_empty_and_roots_equal() -> None:
    root = TREE.root(9)
    assert TREE.consistency_proof(9, 9) == []
    assert _rejection(verify_consistency, 9, 9, root, root, []) is None
    with pytest.raises(ProofError, match="needs an empty proof"):
        verify_consistency(9, 9, root, root, [root])
    with pytest.raises(ProofError, match="roots differ"):
        verify_consistency(9, 9, root, TREE.root(8), [])


def test_consistency_from_empty_tree_is_rejected_when_old_size_zero() -> None:
    with pytest.raises(ProofError, match="empty tree"):
        verify_consistency(0, 5, empty_root(), TREE.root(5), [])
    with pytest.raises(ProofError, match="empty tree"):
        verify_consistency(0, 0, empty_root(), empty_root(), [])
    with pytest.raises(ValueError, match="0 < old_size"):
        TREE.consistency_proof(0, 5)


@pytest.mark.parametrize(
    ("proof_change", "message"),
    [
        (lambda p: p[:-1], "proof too short: expected 5 nodes, got 4"),
        (lambda p: [*p, p[0]], "proof too long: expected 5 nodes, got 6"),
    ],
    ids=["truncated", "extended"],
)
def test_verify_consistency_explains_wrong_length_when_rejected(
    proof_change: Callable[[list[bytes]], list[bytes]], message: str
) -> None:
    proof = proof_change(TREE.consistency_proof(5, 13))
    with pytest.raises(ProofError, match=message):
        verify_consistency(5, 13, TREE.root(5), TREE.root(13), proof)


# --- properties over every size up to PROPERTY_MAX_SIZE -----------------------------------


def test_proofs_verify_for_all_sizes_when_generated_from_random_leaves() -> None:
    leaves = _random_leaves(seed=9162, count=PROPERTY_MAX_SIZE)
    tree = MerkleTree(leaves)
    checked = 0
    for new in range(1, PROPERTY_MAX_SIZE + 1):
        new_root = root_from_leaves(leaves[:new])
        assert tree.root(new) == new_root
        for index in range(new):
            proof = inclusion_proof(leaves[:new], index)
            assert tree.inclusion_proof(index, new) == proof
            verify_inclusion(leaves[index], index, new, proof, new_root)
            checked += 1
        for old in range(1, new + 1):
            proof = consistency_proof(leaves, old, new)
            assert tree.consistency_proof(old, new) == proof
            verify_consistency(old, new, tree.root(old), new_root, proof)
            checked += 1
    assert checked == 2 * sum(range(1, PROPERTY_MAX_SIZE + 1))


def test_proofs_rejected_for_all_sizes_when_truncated_or_extended() -> None:
    leaves = _random_leaves(seed=6962, count=PROPERTY_MAX_SIZE)
    tree = MerkleTree(leaves)
    extra = hashlib.sha256(b"extra").digest()
    for new in range(1, PROPERTY_MAX_SIZE + 1):
        new_root = tree.root(new)
        for index in range(new):
            proof = tree.inclusion_proof(index, new)
            variants = [[*proof, extra]] + ([proof[:-1]] if proof else [])
            for bad in variants:
                with pytest.raises(ProofError):
                    verify_inclusion(leaves[index], index, new, bad, new_root)
        for old in range(1, new + 1):
            proof = tree.consistency_proof(old, new)
            variants = [[*proof, extra]] + ([proof[:-1]] if proof else [])
            for bad in variants:
                with pytest.raises(ProofError):
                    verify_consistency(old, new, tree.root(old), new_root, bad)


@pytest.mark.parametrize("size", [31, 32, 33, 100, 255, 256, 257])
def test_merkle_tree_root_matches_recursive_definition_for_larger_sizes(size: int) -> None:
    leaves = _random_leaves(seed=size, count=257)
    tree = MerkleTree(leaves)
    assert tree.root(size) == root_from_leaves(leaves[:size])


# --- MerkleTree bookkeeping and argument errors -------------------------------------------


def test_merkle_tree_append_returns_index_when_leaves_added() -> None:
    tree = MerkleTree()
    assert [tree.append(h) for h in LEAVES] == list(range(len(LEAVES)))
    assert len(tree) == tree.size == len(LEAVES)
    assert [tree.leaf(i) for i in range(len(LEAVES))] == LEAVES
    assert [tree.root(n) for n in range(len(ROOTS))] == ROOTS


def test_merkle_tree_rejects_leaf_hash_when_not_32_bytes() -> None:
    tree = MerkleTree()
    for bad in (b"", b"\x00" * 31, b"\x00" * 33):
        with pytest.raises(ValueError, match="32 bytes"):
            tree.append(bad)
    assert tree.size == 0


def test_merkle_tree_rejects_arguments_when_out_of_range() -> None:
    tree = MerkleTree(LEAVES)
    with pytest.raises(ValueError, match=r"outside 0\.\.8"):
        tree.root(9)
    with pytest.raises(ValueError, match="out of range"):
        tree.inclusion_proof(8)
    with pytest.raises(ValueError, match="out of range"):
        tree.inclusion_proof(3, 3)
    with pytest.raises(ValueError, match=r"outside 0\.\.8"):
        tree.consistency_proof(2, 9)
    with pytest.raises(ValueError, match="out of range"):
        tree.leaf(8)
    with pytest.raises(ValueError, match="out of range"):
        inclusion_proof(LEAVES, -1)
    with pytest.raises(ValueError, match="exceeds"):
        consistency_proof(LEAVES, 2, 9)


def test_proof_error_is_value_error_when_caught_generically() -> None:
    with pytest.raises(ValueError, match="out of range"):
        verify_inclusion(LEAVES[0], 1, 1, [], ROOTS[1])
