"""The standard-library byte corpus: file rules, deterministic shards, disjoint splits."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from consortium.data import stdlib_corpus
from consortium.data.stdlib_corpus import (
    corpus_digest,
    is_validation_file,
    list_source_files,
    load_stdlib_corpus,
)


def _fake_stdlib(root: Path, names: list[str]) -> Path:
    """A small tree with packages, test dirs and site-packages, written in `names` order."""
    for rel in names:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((f"# {rel}\n" + "x = 1\n" * 40).encode())
    return root


FAKE_FILES = [
    *(f"pkg{i}/mod{j}.py" for i in range(12) for j in range(3)),
    *(f"top{i}.py" for i in range(30)),
    "pkg0/tests/test_a.py",
    "pkg1/test/test_b.py",
    "idlelib/idle_test/test_c.py",
    "site-packages/third/party.py",
    "notes.txt",
]


def test_source_files_exclude_site_packages_tests_and_non_python(tmp_path: Path) -> None:
    files = list_source_files(_fake_stdlib(tmp_path, FAKE_FILES))
    assert files == sorted(files)
    assert len(files) == 12 * 3 + 30
    assert not any("test" in f or "site-packages" in f for f in files)


def test_corpus_is_identical_whatever_the_file_creation_order(tmp_path: Path) -> None:
    first = _fake_stdlib(tmp_path / "a", FAKE_FILES)
    second = _fake_stdlib(tmp_path / "b", list(reversed(FAKE_FILES)))
    one = load_stdlib_corpus(4, 10_000, 2_000, validation_fraction=0.2, root=first)
    two = load_stdlib_corpus(4, 10_000, 2_000, validation_fraction=0.2, root=second)
    assert one.digest == two.digest
    assert one.train_files == two.train_files
    assert all(np.array_equal(a, b) for a, b in zip(one.shards, two.shards, strict=True))


def test_shards_have_equal_fixed_size_within_the_byte_cap(tmp_path: Path) -> None:
    root = _fake_stdlib(tmp_path, FAKE_FILES)
    corpus = load_stdlib_corpus(3, 5_000, 1_000, validation_fraction=0.2, root=root)
    assert corpus.num_shards == 3
    assert {shard.size for shard in corpus.shards} == {5_000 // 3}
    assert all(shard.dtype == np.uint8 and not shard.flags.writeable for shard in corpus.shards)
    assert 0 < corpus.validation.size <= 1_000


def test_digest_covers_shard_contents(tmp_path: Path) -> None:
    root = _fake_stdlib(tmp_path, FAKE_FILES)
    corpus = load_stdlib_corpus(2, 4_000, 1_000, validation_fraction=0.2, root=root)
    assert corpus_digest(corpus.shards, corpus.validation) == corpus.digest
    assert corpus.shard_digests[0] == hashlib.sha256(corpus.shards[0].tobytes()).hexdigest()
    (root / corpus.train_files[0]).write_bytes(b"# changed\n" * 50)
    changed = load_stdlib_corpus(2, 4_000, 1_000, validation_fraction=0.2, root=root)
    assert changed.digest == corpus.digest  # cached: the corpus is read once per process
    stdlib_corpus._load.cache_clear()
    fresh = load_stdlib_corpus(2, 4_000, 1_000, validation_fraction=0.2, root=root)
    assert fresh.digest != corpus.digest


def test_real_stdlib_digest_is_stable_across_reads() -> None:
    first = load_stdlib_corpus(4, 2**18, 2**14)
    stdlib_corpus._load.cache_clear()
    second = load_stdlib_corpus(4, 2**18, 2**14)
    assert first is not second
    assert first.digest == second.digest
    assert all(np.array_equal(a, b) for a, b in zip(first.shards, second.shards, strict=True))


def test_real_stdlib_train_and_validation_do_not_overlap() -> None:
    corpus = load_stdlib_corpus(8, 2**40, 2**40)  # no cap: every file of both splits
    assert corpus.validation_files
    assert not set(corpus.train_files) & set(corpus.validation_files)
    train_groups = {f.split("/", 1)[0] for f in corpus.train_files}
    validation_groups = {f.split("/", 1)[0] for f in corpus.validation_files}
    assert not train_groups & validation_groups
    assert all(is_validation_file(f) for f in corpus.validation_files)
    window = bytes(corpus.validation[1000:1256])
    assert all(window not in shard.tobytes() for shard in corpus.shards)


def test_load_rejects_impossible_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_shards"):
        load_stdlib_corpus(0, 1_000, 100)
    with pytest.raises(ValueError, match="max_train_bytes"):
        load_stdlib_corpus(8, 4, 100)
