"""The on-disk format of a site's dataset file: an .npz with arrays `x` and `y`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt


def save_npz(path: Path, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)
