"""A site's data dir (consortium/data/site_loaders.py) and the training device
(client/devices.py)."""

from __future__ import annotations

import gc
import importlib
import textwrap
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from client.devices import describe_device, resolve_device
from consortium.data.npz import save_npz
from consortium.data.site_loaders import available_datasets, check_data_dir, load_dataset
from consortium.errors import DataDirError, GpuUnavailableError


def arrays(n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=n).astype(np.int64)
    return x, y


def load_error(data_dir: Path, name: str) -> tuple[type[BaseException], str]:
    """The type and message of what load_dataset raises.

    The exception (and its traceback) is dropped before returning, so anything it
    kept alive, such as an open file, is released inside the calling test.
    """
    try:
        load_dataset(data_dir, name)
    except Exception as err:
        return type(err), str(err)
    raise AssertionError(f"load_dataset({name!r}) did not raise")


def unique_module_name() -> str:
    # A fresh name per test, so sys.modules never hands back another test's module.
    return f"site_loader_{uuid.uuid4().hex}"


# --- check_data_dir ------------------------------------------------------------------


def test_check_data_dir_missing_dir_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataDirError, match="does not exist") as excinfo:
        check_data_dir(missing)
    assert str(missing) in str(excinfo.value)


def test_check_data_dir_file_instead_of_dir_raises(tmp_path: Path) -> None:
    a_file = tmp_path / "digits.npz"
    save_npz(a_file, *arrays())
    with pytest.raises(DataDirError, match="not a directory"):
        check_data_dir(a_file)


def test_check_data_dir_empty_dir_raises_saying_no_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataDirError, match="holds no dataset") as excinfo:
        check_data_dir(tmp_path)
    assert ".npz" in str(excinfo.value)
    assert "datasets.toml" in str(excinfo.value)


def test_check_data_dir_unrelated_files_only_counts_as_empty(tmp_path: Path) -> None:
    (tmp_path / "README.txt").write_text("nothing here")
    (tmp_path / "digits.csv").write_text("1,2,3\n")
    with pytest.raises(DataDirError, match="holds no dataset"):
        check_data_dir(tmp_path)


def test_check_data_dir_finds_npz_datasets_sorted(tmp_path: Path) -> None:
    save_npz(tmp_path / "mnist.npz", *arrays())
    save_npz(tmp_path / "digits.npz", *arrays())
    assert check_data_dir(tmp_path) == ["digits", "mnist"]


def test_check_data_dir_finds_datasets_named_in_config(tmp_path: Path) -> None:
    save_npz(tmp_path / "digits.npz", *arrays())
    (tmp_path / "datasets.toml").write_text(
        '[datasets.scans]\npath = "exports/scans.npz"\n[datasets.digits]\npath = "digits.npz"\n'
    )
    assert check_data_dir(tmp_path) == ["digits", "scans"]
    assert available_datasets(tmp_path) == ["digits", "scans"]


def test_check_data_dir_invalid_config_toml_raises_naming_file(tmp_path: Path) -> None:
    (tmp_path / "datasets.toml").write_text("[datasets.digits\npath = 1\n")
    with pytest.raises(DataDirError, match=r"datasets\.toml is not valid TOML"):
        check_data_dir(tmp_path)


def test_check_data_dir_datasets_not_a_table_raises(tmp_path: Path) -> None:
    (tmp_path / "datasets.toml").write_text('datasets = "digits"\n')
    with pytest.raises(DataDirError, match="must be a table"):
        check_data_dir(tmp_path)


# --- load_dataset ---------------------------------------------------------------------


def test_load_dataset_npz_by_name_roundtrips_arrays(tmp_path: Path) -> None:
    x, y = arrays(7)
    save_npz(tmp_path / "digits.npz", x, y)
    dataset = load_dataset(tmp_path, "digits")
    assert dataset.name == "digits"
    assert dataset.x.dtype == np.float32
    assert dataset.y.dtype == np.int64
    assert np.array_equal(dataset.x, x)
    assert np.array_equal(dataset.y, y)


def test_load_dataset_converts_dtypes(tmp_path: Path) -> None:
    x, y = arrays(4)
    np.savez(tmp_path / "digits.npz", x=x.astype(np.float64), y=y.astype(np.int32))
    dataset = load_dataset(tmp_path, "digits")
    assert dataset.x.dtype == np.float32
    assert dataset.y.dtype == np.int64
    assert np.allclose(dataset.x, x)


def test_load_dataset_config_path_relative_to_data_dir(tmp_path: Path) -> None:
    x, y = arrays(5, seed=3)
    save_npz(tmp_path / "exports" / "digits-2024.npz", x, y)
    (tmp_path / "datasets.toml").write_text('[datasets.digits]\npath = "exports/digits-2024.npz"\n')
    dataset = load_dataset(tmp_path, "digits")
    assert np.array_equal(dataset.x, x)
    assert np.array_equal(dataset.y, y)


def test_load_dataset_config_path_wins_over_default_npz(tmp_path: Path) -> None:
    save_npz(tmp_path / "digits.npz", *arrays(3, seed=1))
    x, y = arrays(9, seed=2)
    save_npz(tmp_path / "other.npz", x, y)
    (tmp_path / "datasets.toml").write_text('[datasets.digits]\npath = "other.npz"\n')
    assert len(load_dataset(tmp_path, "digits").y) == 9


def test_load_dataset_config_loader_function_is_called_with_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = unique_module_name()
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / f"{module}.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            CALLS = []

            def load_digits(data_dir):
                CALLS.append(data_dir)
                x = np.full((3, 1, 8, 8), 0.5, dtype=np.float64)
                y = np.array([1, 2, 3])
                return x, y
            """
        )
    )
    monkeypatch.syspath_prepend(str(code_dir))
    data_dir = tmp_path / "site"
    data_dir.mkdir()
    (data_dir / "datasets.toml").write_text(f'[datasets.digits]\nloader = "{module}:load_digits"\n')

    assert check_data_dir(data_dir) == ["digits"]
    dataset = load_dataset(data_dir, "digits")

    assert dataset.x.shape == (3, 1, 8, 8)
    assert dataset.x.dtype == np.float32
    assert dataset.y.tolist() == [1, 2, 3]
    assert dataset.y.dtype == np.int64
    calls = importlib.import_module(module).CALLS
    assert calls == [data_dir]


def test_load_dataset_missing_file_raises_naming_it(tmp_path: Path) -> None:
    save_npz(tmp_path / "digits.npz", *arrays())
    with pytest.raises(DataDirError, match=r"mnist\.npz does not exist"):
        load_dataset(tmp_path, "mnist")


def test_load_dataset_config_path_to_missing_file_raises_naming_it(tmp_path: Path) -> None:
    (tmp_path / "datasets.toml").write_text('[datasets.digits]\npath = "gone/d.npz"\n')
    with pytest.raises(DataDirError, match=r"gone/d\.npz"):
        load_dataset(tmp_path, "digits")


def test_load_dataset_text_file_named_npz_raises_naming_file(tmp_path: Path) -> None:
    (tmp_path / "digits.npz").write_text("this is not numpy data at all")
    with pytest.raises(DataDirError, match=r"digits\.npz"):
        load_dataset(tmp_path, "digits")


def test_load_dataset_npz_without_y_raises_naming_file(tmp_path: Path) -> None:
    x, _ = arrays()
    np.savez(tmp_path / "digits.npz", x=x, labels=np.zeros(len(x)))
    with pytest.raises(DataDirError, match=r"digits\.npz"):
        load_dataset(tmp_path, "digits")


def write_truncated_npz(path: Path) -> None:
    """A half-copied export: starts like a zip archive but is cut off."""
    full = path.with_name("full-copy.npz")
    save_npz(full, *arrays(50))
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])


def test_load_dataset_truncated_npz_raises_naming_file(tmp_path: Path) -> None:
    write_truncated_npz(tmp_path / "digits.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # the leak has its own test
        kind, message = load_error(tmp_path, "digits")
        gc.collect()
    assert issubclass(kind, DataDirError), f"{kind.__name__}: {message}"
    assert "digits.npz" in message


def test_load_dataset_truncated_npz_leaves_no_open_file(tmp_path: Path) -> None:
    write_truncated_npz(tmp_path / "digits.npz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_error(tmp_path, "digits")
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []


def test_load_dataset_empty_npz_file_raises_naming_file(tmp_path: Path) -> None:
    # `touch digits.npz`, or a copy that never got its bytes.
    (tmp_path / "digits.npz").write_bytes(b"")
    kind, message = load_error(tmp_path, "digits")
    assert issubclass(kind, DataDirError), f"{kind.__name__}: {message}"
    assert "digits.npz" in message


def test_load_dataset_single_npy_array_named_npz_raises_naming_file(tmp_path: Path) -> None:
    # `np.save` output renamed to .npz: one array, no x and y.
    with (tmp_path / "digits.npz").open("wb") as f:
        np.save(f, np.zeros((4, 8, 8), dtype=np.float32))
    kind, message = load_error(tmp_path, "digits")
    assert issubclass(kind, DataDirError), f"{kind.__name__}: {message}"
    assert "digits.npz" in message


def test_load_dataset_x_and_y_lengths_differ_raises(tmp_path: Path) -> None:
    x, y = arrays(5)
    save_npz(tmp_path / "digits.npz", x, y[:3])
    with pytest.raises(DataDirError, match="'digits'"):
        load_dataset(tmp_path, "digits")


def test_load_dataset_empty_arrays_raise(tmp_path: Path) -> None:
    save_npz(
        tmp_path / "digits.npz",
        np.zeros((0, 1, 8, 8), dtype=np.float32),
        np.zeros(0, dtype=np.int64),
    )
    with pytest.raises(DataDirError, match="non-empty"):
        load_dataset(tmp_path, "digits")


def test_load_dataset_loader_module_missing_raises_naming_loader(tmp_path: Path) -> None:
    module = unique_module_name()
    (tmp_path / "datasets.toml").write_text(f'[datasets.digits]\nloader = "{module}:load"\n')
    with pytest.raises(DataDirError, match="cannot be imported") as excinfo:
        load_dataset(tmp_path, "digits")
    assert f"{module}:load" in str(excinfo.value)


def test_load_dataset_loader_function_missing_raises_naming_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = unique_module_name()
    (tmp_path / f"{module}.py").write_text("def something_else(d):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "datasets.toml").write_text(f'[datasets.digits]\nloader = "{module}:load"\n')
    with pytest.raises(DataDirError, match="cannot be imported") as excinfo:
        load_dataset(tmp_path, "digits")
    assert f"{module}:load" in str(excinfo.value)


def test_load_dataset_loader_module_with_syntax_error_raises_naming_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A typo in the site's own loader module must still be a DataDirError, not a crash.
    module = unique_module_name()
    (tmp_path / f"{module}.py").write_text("def load(d)\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "datasets.toml").write_text(f'[datasets.digits]\nloader = "{module}:load"\n')
    kind, message = load_error(tmp_path, "digits")
    assert issubclass(kind, DataDirError), f"{kind.__name__}: {message}"
    assert f"{module}:load" in message


# --- resolve_device ---------------------------------------------------------------------


def test_resolve_device_none_is_cpu() -> None:
    assert resolve_device(None) == "cpu"


def test_resolve_device_gpu_without_cuda_raises_mentioning_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GpuUnavailableError, match="--gpu") as excinfo:
        resolve_device(0)
    assert "no CUDA GPU" in str(excinfo.value)


def test_resolve_device_gpu_on_this_machine_raises_when_no_cuda() -> None:
    # The real check on this host; where a GPU is visible, GPU 0 must resolve instead.
    if torch.cuda.is_available():
        assert resolve_device(0) == "cuda:0"
    else:
        with pytest.raises(GpuUnavailableError, match="--gpu"):
            resolve_device(0)


@pytest.mark.parametrize(("gpu", "count"), [(1, 1), (2, 2), (5, 4)])
def test_resolve_device_gpu_index_past_count_raises(
    monkeypatch: pytest.MonkeyPatch, gpu: int, count: int
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(GpuUnavailableError, match=f"--gpu {gpu} does not exist") as excinfo:
        resolve_device(gpu)
    assert f"{count} GPU(s)" in str(excinfo.value)


@pytest.mark.parametrize(("gpu", "count"), [(0, 1), (1, 2), (3, 4)])
def test_resolve_device_gpu_index_below_count_returns_cuda_device(
    monkeypatch: pytest.MonkeyPatch, gpu: int, count: int
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert resolve_device(gpu) == f"cuda:{gpu}"


def test_describe_device_cpu_is_unchanged() -> None:
    assert describe_device("cpu") == "cpu"
