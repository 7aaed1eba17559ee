"""A pretraining checkpoint is written by the run's driver, which runs as the pool user
where `coordinator serve` runs as root, and read back by the coordinator on a resume
(coordinator/pretraining/runner.py): what a subverted driver leaves in its place is
refused, not followed or waited on."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from coordinator.pretraining.checkpoint import checkpoint_path, load_checkpoint


def test_a_link_in_place_of_the_checkpoint_is_refused_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "signing.key"  # stands for the coordinator's own files
    secret.write_bytes(b"not for the driver")
    checkpoint_path(tmp_path).symlink_to(secret)
    with pytest.raises(ValueError, match="is not a checkpoint file"):
        load_checkpoint(tmp_path)


def test_a_fifo_in_place_of_the_checkpoint_is_refused_at_once(tmp_path: Path) -> None:
    """Opened for reading, a FIFO waits for a writer that never comes: the resume would
    hang. The load runs in a thread so that the test fails rather than hangs."""
    os.mkfifo(checkpoint_path(tmp_path))
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            load_checkpoint(tmp_path)
        except BaseException as error:  # handed to the test thread
            outcome.append(error)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(30)
    assert not loader.is_alive(), "load_checkpoint waited on the FIFO"
    assert len(outcome) == 1 and isinstance(outcome[0], ValueError)
    assert "is not a regular file" in str(outcome[0])


def test_no_checkpoint_yet_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None
