"""The text task of federated fine-tuning: the docstrings corpus, site text files,
commitments to text, models by name and options, and local fine-tuning."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from consortium.data import docstrings
from consortium.data.site_loaders import available_datasets, load_text
from consortium.errors import DataDirError, JobSpecError
from consortium.lm import FineTuneConfig, fine_tune, perplexity, validation_loss
from consortium.models import build_model, load_parameter_tensors, parameter_tensors
from consortium.provenance.commitment import commit_text
from coordinator.jobs.spec import parse_job_spec

SMALL = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32}


def test_packages_are_shared_out_once_each() -> None:
    shares = docstrings.packages_for(3)
    flat = [p for share in shares for p in share]
    assert sorted(flat) == sorted(docstrings.PACKAGES)
    assert all(shares) and len(set(flat)) == len(flat)
    with pytest.raises(ValueError, match="at least one institution"):
        docstrings.packages_for(0)


def test_docstring_corpus_is_deterministic_and_split_by_file() -> None:
    first = docstrings.package_text("click", 16 * 1024)
    docstrings.package_text.cache_clear()
    again = docstrings.package_text("click", 16 * 1024)
    assert first == again
    assert 0 < len(first.train) <= 16 * 1024 and first.held_out
    assert first.train[:200] not in first.held_out
    root = docstrings.package_root("click")
    held = [p for p in root.rglob("*.py") if docstrings.is_held_out(p.relative_to(root).as_posix())]
    assert held, "some click files fall in the held-out split"


def test_file_docstrings_reads_module_class_and_function_docs(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        '"""Module."""\nclass A:\n    """Class."""\n    def f(self):\n        """Fn."""\n'
    )
    assert docstrings.file_docstrings(source) == ["Module.", "Class.", "Fn."]
    (tmp_path / "bad.py").write_text("print 'python 2'\n")
    assert docstrings.file_docstrings(tmp_path / "bad.py") == []


def test_unknown_package_is_a_clear_error() -> None:
    with pytest.raises(DataDirError, match="not installed"):
        docstrings.package_root("no_such_package_xyz")


def test_site_text_file_is_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "README.txt").write_text("not a dataset")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "docstrings.txt").write_bytes(b"line one\nline two\n")
    assert available_datasets(tmp_path) == ["docstrings"]
    text = load_text(tmp_path, "docstrings")
    assert text.data.dtype == np.uint8 and text.data.size == 18
    (tmp_path / "text" / "empty.txt").write_bytes(b"  \n")
    with pytest.raises(DataDirError, match="is empty"):
        load_text(tmp_path, "empty")
    with pytest.raises(DataDirError, match="does not exist"):
        load_text(tmp_path, "missing")


def test_text_commitment_counts_lines_and_changes_with_any_line() -> None:
    key = b"k" * 32
    base = commit_text("docstrings", b"a\nb\nc", key)
    assert base.count == 3
    assert commit_text("docstrings", b"a\nb\nc", key) == base
    assert commit_text("docstrings", b"a\nB\nc", key).commitment != base.commitment
    assert commit_text("docstrings", b"a\nb\nc", b"j" * 32).commitment != base.commitment
    expected = hashlib.sha256(b'{"text":"lines"}').hexdigest()
    assert base.schema_digest == expected


def test_bytelm_by_name_with_options_and_tied_weights_listed_once() -> None:
    model = build_model("bytelm", SMALL)
    names = list(parameter_tensors(model))
    assert "wte.weight" in names and "lm_head.weight" not in names
    with pytest.raises(ValueError, match="unknown bytelm options"):
        build_model("bytelm", {"depth": 2})
    with pytest.raises(ValueError, match="takes no options"):
        build_model("digits-cnn", {"n_layer": 1})


def test_load_parameter_tensors_refuses_weights_of_another_shape() -> None:
    model = build_model("bytelm", SMALL)
    wider = build_model("bytelm", {**SMALL, "n_embd": 32})
    with pytest.raises(ValueError, match="has shape"):
        load_parameter_tensors(model, parameter_tensors(wider))
    partial = dict(parameter_tensors(model))
    partial.pop("wpe.weight")
    with pytest.raises(ValueError, match=re.escape("missing ['wpe.weight']")):
        load_parameter_tensors(model, partial)


def test_fine_tune_is_seeded_and_lowers_loss_on_its_text() -> None:
    text = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 40, np.uint8)
    config = FineTuneConfig(steps=30, batch_size=8, seq_len=16, learning_rate=3e-3, seed=5)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("bytelm", SMALL)
        before = validation_loss(model, text, 16, 8, 4)
        outcome = fine_tune(model, text, config, torch.device("cpu"))
        after = validation_loss(model, text, 16, 8, 4)
        runs.append((before, after, outcome))
    (before, after, outcome), (_, after_again, _) = runs
    assert after < before and after == after_again
    assert outcome.windows == 30 * 8
    assert perplexity(after) == pytest.approx(np.exp(after))
    with pytest.raises(ValueError, match="shorter than seq_len"):
        fine_tune(model, text[:10], config, torch.device("cpu"))


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ('model = "digits-cnn"\ndataset = "docstrings"', "field 'dataset'"),
        ('model = "bytelm"\ndataset = "docstrings"\nmodel_options = {n_head = 3}', "model_options"),
        (
            'model = "bytelm"\ndataset = "docstrings"\ninit_from = "a"\n'
            "model_options = {n_layer = 1}",
            "exclude each other",
        ),
    ],
)
def test_text_job_spec_errors_name_the_problem(extra: str, field: str) -> None:
    with pytest.raises(JobSpecError, match=field):
        parse_job_spec(f'name = "t"\nrounds = 1\n{extra}\n')
