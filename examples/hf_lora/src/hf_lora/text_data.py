"""A site's text, read offline with `datasets` from its own files, and cut into token
blocks with the base model's own tokenizer.

A dataset is the file a site's data dir names for it (consortium's conventions:
`text/<name>.txt`, or the `path` of its entry in `datasets.toml`): plain text (one row
per line), JSON Lines or Parquet with a `text` field. Rows are read once per job; they
are tokenized once per tokenizer (a site keeps them between a job's rounds).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import hf_lora.base_model  # noqa: F401 (sets the Hugging Face libraries offline first)
from consortium.data.site_loaders import dataset_file
from consortium.errors import DataDirError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

TEXT_FIELD = "text"
# The `datasets` builder for each file kind.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class SiteText:
    name: str
    builder: str  # how it was read: text, json or parquet
    rows: list[str]
    _blocks: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def blocks(self, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
        """The rows as one token stream (each row ended by the tokenizer's end-of-text),
        cut into non-overlapping blocks of `seq_len` tokens: shape (blocks, seq_len)."""
        # The tokenizer by its directory (digest-checked when the model was built)
        key = (str(tokenizer.name_or_path), len(tokenizer), seq_len)
        if key not in self._blocks:
            # One cut kept: a coordinator naming a new seq_len in every message would
            # otherwise have the site keep one more copy of its text each time.
            self._blocks.clear()
            self._blocks[key] = token_blocks(self.rows, tokenizer, seq_len)
        return self._blocks[key]

    def records(self) -> list[bytes]:
        """What the site commits to: each row's UTF-8 bytes."""
        return [row.encode("utf-8") for row in self.rows]


def token_blocks(rows: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    import torch

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the base model's tokenizer has no end-of-text token")
    stream: list[int] = []
    for ids in tokenizer(rows, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(int(eos))
    count = len(stream) // seq_len
    if count == 0:
        raise ValueError(f"{len(stream)} tokens do not fill one block of {seq_len}")
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)


def load_site_text(data_dir: Path, name: str) -> SiteText:
    """Dataset `name` of the site's data dir; raises DataDirError when it is missing,
    of a kind `datasets` is not asked to read here, or has no `text` rows."""
    path = dataset_file(data_dir, name)
    builder = BUILDERS.get(path.suffix)
    if builder is None:
        raise DataDirError(f"text dataset {name!r}: {path} is not .txt, .jsonl, .json or .parquet")
    if not path.is_file():
        raise DataDirError(f"text dataset {name!r}: {path} does not exist")
    import datasets

    datasets.disable_progress_bars()
    # Read into memory; the cache `datasets` writes while preparing goes with the
    # temporary directory (a site's data dir stays as the site left it).
    with tempfile.TemporaryDirectory(prefix="hf-lora-datasets-") as cache:
        try:
            table = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
            )
        except Exception as err:  # datasets raises its own kinds per format
            raise DataDirError(f"text dataset {name!r}: cannot read {path}: {err}") from None
    if TEXT_FIELD not in table.column_names:
        raise DataDirError(
            f"text dataset {name!r}: {path} has no {TEXT_FIELD!r} field "
            f"(fields: {', '.join(table.column_names)})"
        )
    rows = [row for row in table[TEXT_FIELD] if isinstance(row, str) and row.strip()]
    if not rows:
        raise DataDirError(f"text dataset {name!r}: {path} has no text")
    return SiteText(name, builder, rows)
