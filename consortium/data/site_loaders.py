"""Map the dataset names a job asks for to this site's local loaders.

A site's data dir holds, for each dataset, either `<name>.npz` (arrays `x`
and `y`; for text datasets such as `docstrings`, `text/<name>.txt`), or an entry in
`datasets.toml` naming a file or a loader function::

    [datasets.digits]
    path = "exports/digits-2024.npz"        # an .npz with arrays x and y

    [datasets.digits]
    loader = "my_site.loaders:load_digits"  # a callable (data_dir: Path) -> (x, y)

    [datasets.notes]
    path = "exports/notes.jsonl"            # text: .txt, or rows with a `text` field
                                            # (.jsonl, .parquet) for workloads that read them

So a user's own data works the same way as the built-in demo partitions.
"""

from __future__ import annotations

import importlib
import logging
import tomllib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt

from consortium.data import TEXT_DIR
from consortium.errors import DataDirError

log = logging.getLogger(__name__)

CONFIG_FILE = "datasets.toml"
# Text files a workload may read (plain text, JSON Lines, Parquet): a site declares
# their size in bytes as the most examples they can hold.
TEXT_SUFFIXES = frozenset({".txt", ".jsonl", ".json", ".parquet"})

Loader = Callable[[Path], tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]]


@dataclass(frozen=True)
class LocalDataset:
    name: str
    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]


def check_data_dir(data_dir: Path) -> list[str]:
    """The dataset names this site offers; raises DataDirError when there are none."""
    if not data_dir.exists():
        raise DataDirError(f"data dir {data_dir} does not exist")
    if not data_dir.is_dir():
        raise DataDirError(f"data dir {data_dir} is not a directory")
    names = available_datasets(data_dir)
    if not names:
        raise DataDirError(
            f"data dir {data_dir} holds no dataset: add <name>.npz (arrays x, y), "
            f"{TEXT_DIR}/<name>.txt (text) or a "
            f"{CONFIG_FILE} mapping dataset names to files or loaders"
        )
    return names


def available_datasets(data_dir: Path) -> list[str]:
    names = {p.stem for p in data_dir.glob("*.npz")}
    names |= {p.stem for p in (data_dir / TEXT_DIR).glob("*.txt")}
    names |= set(_config(data_dir))
    return sorted(names)


def _config(data_dir: Path) -> dict[str, dict[str, str]]:
    path = data_dir / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise DataDirError(f"{path} is not valid TOML: {err}") from None
    datasets = raw.get("datasets", {})
    if not isinstance(datasets, dict):
        raise DataDirError(f"{path}: [datasets] must be a table")
    return cast(dict[str, dict[str, str]], datasets)


def load_arrays(
    data_dir: Path, name: str
) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.generic], str]:
    """An array dataset's `x` and `y` as stored (no conversion), and where they came
    from (the file, or the loader)."""
    entry = _config(data_dir).get(name)
    if entry is not None and "loader" in entry:
        x, y = _import_loader(entry["loader"])(data_dir)
        return np.asarray(x), np.asarray(y), f"loader {entry['loader']}"
    path = data_dir / (entry["path"] if entry and "path" in entry else f"{name}.npz")
    x, y = _load_npz(path)
    return x, y, str(path)


def load_dataset(data_dir: Path, name: str) -> LocalDataset:
    x, y, _ = load_arrays(data_dir, name)
    if len(x) != len(y) or len(y) == 0:
        raise DataDirError(f"dataset {name!r} at {data_dir}: x and y must be non-empty and equal")
    return LocalDataset(name, np.asarray(x, np.float32), np.asarray(y, np.int64))


def _load_npz(path: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    if not path.exists():
        raise DataDirError(f"dataset file {path} does not exist")
    problem = f"dataset file {path} is not an .npz with arrays x and y"
    # Open the file ourselves so it is closed even when numpy cannot parse it.
    with path.open("rb") as handle:
        try:
            archive = np.load(handle)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise DataDirError(f"{problem}: {err}") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataDirError(f"{problem}: it holds a single array")
        with archive:
            try:
                return archive["x"], archive["y"]
            except (KeyError, ValueError, zipfile.BadZipFile) as err:
                raise DataDirError(f"{problem}: {err}") from None


def _import_loader(reference: str) -> Loader:
    module_name, _, attribute = reference.partition(":")
    try:
        loader = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, SyntaxError) as err:
        raise DataDirError(f"dataset loader {reference!r} cannot be imported: {err}") from None
    return cast(Loader, loader)


@dataclass(frozen=True)
class LocalText:
    name: str
    text: bytes

    @property
    def data(self) -> npt.NDArray[np.uint8]:
        return np.frombuffer(self.text, dtype=np.uint8)


def dataset_file(data_dir: Path, name: str) -> Path:
    """Where text dataset `name` is: the file `datasets.toml` names for it, else
    `text/<name>.txt` (which need not exist)."""
    entry = _config(data_dir).get(name)
    return data_dir / (entry["path"] if entry and "path" in entry else f"{TEXT_DIR}/{name}.txt")


def load_text(data_dir: Path, name: str) -> LocalText:
    """A text dataset: `text/<name>.txt`, or the file `datasets.toml` names for it."""
    path = dataset_file(data_dir, name)
    if not path.is_file():
        raise DataDirError(f"text dataset {name!r}: {path} does not exist")
    text = path.read_bytes()
    if not text.strip():
        raise DataDirError(f"text dataset {name!r}: {path} is empty")
    return LocalText(name, text)


def count_examples(data_dir: Path) -> int:
    """The most examples any one dataset of this site holds: rows of an array dataset,
    bytes of a text one (a training window, or a block of tokens, starts at a byte).

    A site declares it when it joins, and the coordinator refuses an update that claims
    to have trained on more. An .npz is not loaded: only the header of its `y` array is
    read. A dataset that cannot be read is left out (it cannot train either).
    """
    counts = [0]
    for name in available_datasets(data_dir):
        try:
            counts.append(_dataset_size(data_dir, name))
        except (DataDirError, OSError, ValueError) as err:
            log.warning("dataset %r is left out of the declared example count: %s", name, err)
    return max(counts)


def _dataset_size(data_dir: Path, name: str) -> int:
    entry = _config(data_dir).get(name) or {}
    text = data_dir / (entry.get("path") or f"{TEXT_DIR}/{name}.txt")
    if text.suffix in TEXT_SUFFIXES and text.is_file():
        return text.stat().st_size  # no window or token block is shorter than a byte
    if "loader" in entry:
        return len(load_dataset(data_dir, name).y)
    return _npz_rows(data_dir / (entry.get("path") or f"{name}.npz"))


def _npz_rows(path: Path) -> int:
    """Rows of the `y` array of an .npz, from its .npy header alone."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("y.npy") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(handle)
    except (KeyError, zipfile.BadZipFile) as err:
        raise DataDirError(
            f"dataset file {path} is not an .npz with arrays x and y: {err}"
        ) from None
    return int(shape[0]) if shape else 0
