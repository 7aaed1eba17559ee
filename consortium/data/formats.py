"""What each dataset a job can name must look like at a site: one definition, checked.

A job names a dataset (`dataset = "digits"`); each site provides it from its own data
dir (consortium/data/site_loaders.py says where). The model the job trains fixes the dataset's
format, so a site's file that does not match would fail every round at that site;
`check_arrays` and `check_text` say what is wrong before the site joins
(`client data check`, and `client join` before it connects). docs/onboarding.md
("Site data") is written from these definitions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from consortium.errors import DataDirError


@dataclass(frozen=True)
class ArrayFormat:
    """An .npz dataset: `x` (float, one row per example) and `y` (integer labels)."""

    name: str
    row_shape: tuple[int, ...]  # x's shape after its first (example) axis
    value_range: tuple[float, float]  # every x value lies in it
    classes: int  # y holds 0 .. classes - 1
    hint: str  # how a common source is brought into this format

    def describe(self) -> str:
        shape = ", ".join(["n", *map(str, self.row_shape)])
        low, high = self.value_range
        return (
            f"x: float32 ({shape}) in [{low:g}, {high:g}]; y: integers 0..{self.classes - 1}, "
            f"n of them"
        )


@dataclass(frozen=True)
class TextFormat:
    """A text dataset: one UTF-8 (or any byte) file, trained on as bytes."""

    name: str

    def describe(self) -> str:
        return "a non-empty text file (bytes; UTF-8 expected)"


DatasetFormat = ArrayFormat | TextFormat

FORMATS: dict[str, DatasetFormat] = {
    "digits": ArrayFormat(
        "digits",
        row_shape=(1, 8, 8),
        value_range=(0.0, 1.0),
        classes=10,
        hint=(
            "scikit-learn's load_digits() gives images 0..16 as (n, 64) or (n, 8, 8): "
            "x = (images / 16.0).astype('float32').reshape(-1, 1, 8, 8)"
        ),
    ),
    "docstrings": TextFormat("docstrings"),
}


def check_arrays(
    fmt: ArrayFormat, x: npt.NDArray[np.generic], y: npt.NDArray[np.generic], where: str
) -> int:
    """The number of examples; raises DataDirError naming what does not match `fmt`."""

    def refuse(problem: str) -> DataDirError:
        return DataDirError(
            f"dataset {fmt.name!r} at {where}: {problem}. Expected {fmt.describe()}. {fmt.hint}"
        )

    if x.ndim == 0 or tuple(x.shape[1:]) != fmt.row_shape:
        raise refuse(f"x has shape {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise refuse(f"x holds {x.dtype}, not floating-point values")
    if y.ndim != 1:
        raise refuse(f"y has shape {tuple(y.shape)}, not (n,)")
    if len(x) != len(y):
        raise refuse(f"x has {len(x)} examples but y has {len(y)} labels")
    if len(y) == 0:
        raise refuse("it holds no example")
    if not np.all(np.isfinite(x)):
        raise refuse("x holds NaN or infinite values")
    low, high = fmt.value_range
    if float(x.min()) < low or float(x.max()) > high:
        raise refuse(f"x ranges over [{float(x.min()):g}, {float(x.max()):g}]")
    if not np.issubdtype(y.dtype, np.integer):
        raise refuse(f"y holds {y.dtype}, not integer labels")
    if int(y.min()) < 0 or int(y.max()) >= fmt.classes:
        raise refuse(f"y holds labels {int(y.min())}..{int(y.max())}")
    return len(y)


def check_text(fmt: TextFormat, text: bytes, where: str) -> int:
    """The number of bytes; raises DataDirError when the text is empty."""
    if not text.strip():
        raise DataDirError(f"dataset {fmt.name!r} at {where}: the file holds no text")
    return len(text)
