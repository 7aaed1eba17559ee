"""The Hugging Face LoRA workload (examples/hf_lora, issue 16), in-process on a tiny
random Llama-style model built here with its own tokenizer (nothing is downloaded):
only the adapters travel, training is deterministic given the seed and lowers held-out
perplexity, a site whose base model differs from the job's refuses to build it, a spec
must name the base model and its digest, and a site's text is read offline with
`datasets` from plain text, JSON Lines or Parquet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hf_lora.base_model import ROOTS_ENV, BaseModelError, directory_digest, parameter_count
from hf_lora.make_tiny import make_tiny_model
from hf_lora.text_data import load_site_text
from hf_lora.workload import HuggingFaceLoRA

from consortium.data.site_loaders import count_examples
from consortium.errors import DataDirError, JobSpecError
from consortium.workloads import RoundBudget, load_workload
from coordinator.jobs.spec import parse_submitted_spec

BUDGET = RoundBudget(epochs=1, steps=8, batch_size=8, learning_rate=0.02, seed=3, seq_len=32)
CPU = torch.device("cpu")
KEY = b"k" * 32
SITE_ROWS = [f"def helper_{i}(value):\n    return value * {i} + 1" for i in range(200)]


@pytest.fixture(autouse=True)
def model_roots(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine keeps its base models in the tests' temporary dirs."""
    monkeypatch.setenv(ROOTS_ENV, str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    directory = tmp_path_factory.mktemp("models") / "tiny-llama"
    return directory, make_tiny_model(directory)


@pytest.fixture
def options(tiny: tuple[Path, str]) -> dict[str, int | str]:
    return {"base_model": str(tiny[0]), "base_model_digest": tiny[1]}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "code.txt").write_text("\n".join(SITE_ROWS))
    return tmp_path


def test_it_is_installed_as_a_workload_and_only_its_adapters_travel(
    options: dict[str, int | str],
) -> None:
    workload = load_workload("hf-lora")
    assert isinstance(workload, HuggingFaceLoRA)
    model = workload.build_model(options)
    adapters = workload.exchanged(model)
    assert adapters and all(".lora_A." in name or ".lora_B." in name for name in adapters)
    travelling = sum(t.numel() for t in adapters.values())
    full = workload.parameter_count(options)
    assert full == sum(p.numel() for p in model.parameters()) - travelling
    assert travelling / full < 0.05


def test_training_is_deterministic_and_lowers_held_out_perplexity(
    options: dict[str, int | str], site: Path
) -> None:
    workload = HuggingFaceLoRA()
    data = workload.load_site_data(site, "code")
    held_out = workload.held_out("code", BUDGET, eval_batches=2)
    results = []
    for _ in range(2):
        torch.manual_seed(0)  # as the coordinator seeds the adapters' first values
        model = workload.build_model(options)
        before = held_out.evaluate(model)["eval_perplexity"]
        first = workload.train(model, data, BUDGET, CPU, KEY)
        second = workload.train(model, data, BUDGET, CPU, KEY)
        results.append((model, first, second, before))
    (model, first, second, before), (again, *_rest) = results
    for name, tensor in workload.exchanged(model).items():
        assert torch.equal(tensor, workload.exchanged(again)[name]), name
    assert second.loss < first.loss
    assert held_out.evaluate(model)["eval_perplexity"] < before
    assert 0 < first.examples <= count_examples(site)
    # A plain-text dataset's rows are its lines, as `datasets` reads them.
    assert first.commitment.count == len("\n".join(SITE_ROWS).splitlines())
    site_eval = workload.evaluate(model, data, BUDGET, CPU)
    assert site_eval.examples > 0 and site_eval.metrics["eval_perplexity"] > 1


def test_adapters_that_do_not_fit_are_refused(options: dict[str, int | str]) -> None:
    workload = HuggingFaceLoRA()
    model = workload.build_model(options)
    adapters = dict(workload.exchanged(model))
    name, tensor = next(iter(adapters.items()))
    with pytest.raises(ValueError, match="missing"):
        workload.load_exchanged(model, {k: v for k, v in adapters.items() if k != name})
    with pytest.raises(ValueError, match="shape"):
        workload.load_exchanged(model, {**adapters, name: torch.zeros(tensor.shape[0] + 1, 1)})
    wider = workload.build_model({**options, "lora_r": 4})
    with pytest.raises(ValueError, match="shape"):
        workload.load_exchanged(wider, adapters)


def test_a_site_whose_base_model_differs_from_the_jobs_refuses_it(
    tiny: tuple[Path, str], options: dict[str, int | str], tmp_path: Path
) -> None:
    altered = tmp_path / "tiny-llama"
    shutil.copytree(tiny[0], altered)
    config = json.loads((altered / "config.json").read_text())
    (altered / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    with pytest.raises(BaseModelError, match=f"the job expects {tiny[1]}"):
        HuggingFaceLoRA().build_model({**options, "base_model": str(altered)})
    with pytest.raises(BaseModelError, match="does not exist on this machine"):
        HuggingFaceLoRA().build_model({**options, "base_model": str(tmp_path / "nowhere")})
    with pytest.raises(BaseModelError, match="Hugging Face cache"):
        HuggingFaceLoRA().build_model({**options, "base_model": "some-org/not-cached"})


SPEC = """\
name = "lora"
workload = "hf-lora"
dataset = "code"
rounds = 2
"""


@pytest.mark.parametrize(
    ("model_options", "complaint"),
    [
        ("", "needs model_options.base_model"),
        ('base_model = "{dir}"', "needs model_options.base_model_digest"),
        ('base_model = "{dir}"\nbase_model_digest = "{wrong}"', "the job expects " + "0" * 64),
        ('base_model = "{dir}"\nbase_model_digest = "xyz"', "64 lowercase hex"),
        ('base_model = "{dir}"\nbase_model_digest = "{digest}"\nlora_r = "8"', "must be a int"),
        ('base_model = "{dir}"\nbase_model_digest = "{digest}"\nrank = 8', "takes no option rank"),
        ('base_model = "{dir}"\nbase_model_digest = "{digest}"\nlora_r = 0', "1 <= lora_r"),
    ],
)
def test_a_spec_must_name_the_base_model_and_its_digest(
    tiny: tuple[Path, str], model_options: str, complaint: str
) -> None:
    table = model_options.format(dir=tiny[0], digest=tiny[1], wrong="0" * 64)
    with pytest.raises(JobSpecError, match="model_options") as refused:
        parse_submitted_spec(f"{SPEC}\n[model_options]\n{table}\n")
    assert complaint in str(refused.value)


def test_a_well_formed_spec_is_accepted_with_its_string_options(tiny: tuple[Path, str]) -> None:
    table = f'base_model = "{tiny[0]}"\nbase_model_digest = "{tiny[1]}"\nlora_r = 4'
    spec = parse_submitted_spec(f"{SPEC}\n[model_options]\n{table}\n")
    assert spec.model_options == {
        "base_model": str(tiny[0]),
        "base_model_digest": tiny[1],
        "lora_r": 4,
    }


def test_a_config_only_base_model_is_built_from_its_seed(tmp_path: Path) -> None:
    directory = tmp_path / "config-only"
    digest = make_tiny_model(directory, weights=False)
    assert not list(directory.glob("*.safetensors"))
    assert directory_digest(directory) == digest
    options = {"base_model": str(directory), "base_model_digest": digest}
    workload = HuggingFaceLoRA()
    first, second = workload.build_model(options), workload.build_model(options)
    other = workload.build_model({**options, "init_seed": 1})
    frozen = [n for n, p in first.named_parameters() if not p.requires_grad]
    weights = dict(first.named_parameters())
    assert all(torch.equal(weights[n], dict(second.named_parameters())[n]) for n in frozen)
    assert not all(torch.equal(weights[n], dict(other.named_parameters())[n]) for n in frozen)
    assert parameter_count(directory) == sum(weights[n].numel() for n in frozen)


def test_site_text_is_read_offline_from_json_lines_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    exports = tmp_path / "exports"
    exports.mkdir()
    rows = ["first note", "second note", "  ", "third note"]
    (exports / "notes.jsonl").write_text("\n".join(json.dumps({"text": r}) for r in rows))
    pq.write_table(pa.table({"text": rows, "id": list(range(4))}), exports / "notes.parquet")
    (exports / "labels.jsonl").write_text(json.dumps({"label": 1}))
    (tmp_path / "datasets.toml").write_text(
        '[datasets.notes]\npath = "exports/notes.jsonl"\n'
        '[datasets.table]\npath = "exports/notes.parquet"\n'
        '[datasets.labels]\npath = "exports/labels.jsonl"\n'
        '[datasets.binary]\npath = "exports/notes.bin"\n'
    )
    expected = ["first note", "second note", "third note"]  # blank rows are left out
    notes, table = load_site_text(tmp_path, "notes"), load_site_text(tmp_path, "table")
    assert (notes.rows, notes.builder) == (expected, "json")
    assert (table.rows, table.builder) == (expected, "parquet")
    # A site declares the bytes of its text files as the most examples they hold.
    assert count_examples(tmp_path) == (exports / "notes.parquet").stat().st_size
    with pytest.raises(DataDirError, match="has no 'text' field"):
        load_site_text(tmp_path, "labels")
    with pytest.raises(DataDirError, match=r"is not \.txt, \.jsonl"):
        load_site_text(tmp_path, "binary")
    with pytest.raises(DataDirError, match="does not exist"):
        load_site_text(tmp_path, "absent")
    assert not list(tmp_path.rglob("*.arrow"))  # datasets' cache did not land in the data dir


@pytest.mark.parametrize("reference", ["/etc", "../../../etc", "{outside}"])
def test_a_base_model_directory_outside_the_sites_model_roots_is_refused_unread(
    options: dict[str, int | str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: str
) -> None:
    """The job's author names the directory: without the site's roots the coordinator
    made a site hash any tree its user could read, and learnt from the reply what
    existed there."""
    monkeypatch.setenv(ROOTS_ENV, str(Path(str(options["base_model"])).parent))
    outside = tmp_path / "private-notes"
    outside.mkdir()
    (outside / "notes.txt").write_text("the site's own\n")
    hashed: list[Path] = []
    monkeypatch.setattr("hf_lora.base_model.directory_digest", hashed.append)
    named = {**options, "base_model": reference.format(outside=outside)}
    with pytest.raises(BaseModelError, match="not below a model root"):
        HuggingFaceLoRA().parameter_count(named)
    assert hashed == []


def test_a_site_keeps_one_cut_of_its_text_whatever_window_each_message_names(
    tiny: tuple[Path, str], site: Path
) -> None:
    """A coordinator naming a new seq_len in every message had the site keep one more
    tokenized copy of its text each time, for the whole run."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny[0], local_files_only=True)
    text = load_site_text(site, "code")
    for seq_len in (8, 9, 10, 11):
        assert text.blocks(tokenizer, seq_len).shape[1] == seq_len
    assert len(text._blocks) == 1
    assert text.blocks(tokenizer, 11).shape[1] == 11  # the latest stays cached
