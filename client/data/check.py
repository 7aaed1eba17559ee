"""Check a site's data against the formats jobs expect (`client data check`, and
`client join` before it connects), and write example data a new site can start with
(`client data example`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from consortium.data.formats import FORMATS, ArrayFormat, check_arrays, check_text
from consortium.data.site_loaders import available_datasets, check_data_dir, load_arrays, load_text
from consortium.errors import DataDirError, InvalidArgumentError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckedDataset:
    name: str
    examples: int  # rows of an array dataset, bytes of a text one
    known: bool  # False: no job kind names it, so its format is not checked


def check_dataset(data_dir: Path, name: str) -> CheckedDataset:
    """One dataset of the site, checked against its format; DataDirError says what is
    wrong and how to fix it."""
    fmt = FORMATS.get(name)
    if fmt is None:
        return CheckedDataset(name, 0, known=False)
    if isinstance(fmt, ArrayFormat):
        x, y, where = load_arrays(data_dir, name)
        return CheckedDataset(name, check_arrays(fmt, x, y, where), known=True)
    text = load_text(data_dir, name)
    return CheckedDataset(name, check_text(fmt, text.text, str(data_dir)), known=True)


def check_site_data(data_dir: Path, names: Sequence[str] = ()) -> list[CheckedDataset]:
    """Every dataset the site offers (or only `names`), each checked; raises on the first
    that is missing or malformed."""
    offered = check_data_dir(data_dir)
    for name in names:
        if name not in offered:
            raise DataDirError(
                f"data dir {data_dir} has no dataset {name!r}; it offers: {', '.join(offered)}"
            )
    return [check_dataset(data_dir, name) for name in (names or available_datasets(data_dir))]


def write_example(dataset: str, data_dir: Path, part: int, parts: int) -> Path:
    """Part `part` of `parts` of a dataset's shareable pool, in the site format: a
    start for a new site (or a test) before it brings its own data."""
    if not 1 <= part <= parts:
        raise InvalidArgumentError(f"--part must be between 1 and --of ({parts}), not {part}")
    if dataset == "digits":
        import numpy as np

        from consortium.data.digits import train_test_split
        from consortium.data.npz import save_npz

        train, _ = train_test_split()  # the held-out split stays with the coordinator
        indices = np.array_split(np.arange(len(train.y)), parts)[part - 1]
        path = data_dir / "digits.npz"
        save_npz(path, train.x[indices], train.y[indices])
        return path
    if dataset == "docstrings":
        from consortium.data import TEXT_DIR
        from consortium.data.docstrings import (
            DEFAULT_BYTES_PER_PACKAGE,
            packages_for,
            site_text,
        )

        path = data_dir / TEXT_DIR / "docstrings.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(site_text(packages_for(parts)[part - 1], DEFAULT_BYTES_PER_PACKAGE))
        return path
    raise InvalidArgumentError(f"no example data for {dataset!r}; known: {', '.join(FORMATS)}")
