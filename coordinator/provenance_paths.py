"""Where the coordinator keeps its signing key and its provenance log."""

from __future__ import annotations

from pathlib import Path


def coordinator_key_path(data_dir: Path) -> Path:
    return data_dir / "keys" / "coordinator-signing.key"


def coordinator_public_key_path(data_dir: Path) -> Path:
    return coordinator_key_path(data_dir).with_suffix(".pub")


def provenance_log_path(data_dir: Path) -> Path:
    return data_dir / "provenance" / "log.jsonl"
