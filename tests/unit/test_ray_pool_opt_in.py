"""The shared Ray pool is opt-in (issue 17): every member holding the cluster token can
run code on a pool node, so a site's `client join` starts no Ray process unless it was
asked to (`--ray`), and says what that trusts where the choice is made."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.cli import app
from client.data.check import write_example
from client.join import Joined, SiteNode
from client.settings import ClientSettings
from consortium.errors import SettingsError
from consortium.settings import load_settings


def site_settings(tmp_path: Path, **overrides: object) -> ClientSettings:
    data = tmp_path / "data"
    write_example("digits", data, 1, 1)
    return load_settings(
        ClientSettings,
        None,
        coordinator="127.0.0.1:1",
        institution="alpha",
        data=data,
        insecure=True,
        state_dir=tmp_path / "state",
        **overrides,
    )


def test_a_site_that_did_not_ask_starts_no_ray_node_for_a_coordinator_with_ray(
    tmp_path: Path,
) -> None:
    settings = site_settings(tmp_path)
    assert settings.ray_enabled is False
    said: list[str] = []
    site = SiteNode(settings, on_event=said.append)
    joined = Joined("node-1", "127.0.0.1:2", 10.0, ray_address="127.0.0.1:6379")
    assert site._start_ray_worker(joined) is None
    assert not (settings.resolved_state_dir / "logs" / "ray-worker.log").exists()
    assert said == []


def test_a_site_that_asked_joins_no_pool_where_the_coordinator_runs_none(tmp_path: Path) -> None:
    settings = site_settings(tmp_path, ray_enabled=True)
    said: list[str] = []
    site = SiteNode(settings, on_event=said.append)
    worker = site._start_ray_worker(Joined("node-1", "127.0.0.1:2", 10.0, ray_address=""))
    assert worker is None  # the coordinator runs without Ray: nothing to join
    assert said == ["the coordinator runs without Ray: contributing no compute to pretraining"]


def test_a_port_range_without_the_pool_is_refused_not_ignored(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"ray_port_range is for a node of the Ray pool"):
        site_settings(tmp_path, ray_port_range="20000-20099")
    assert site_settings(tmp_path, ray_enabled=True, ray_port_range="20000-20099").ray_enabled


def test_join_help_says_what_joining_the_pool_trusts() -> None:
    result = CliRunner().invoke(app, ["join", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = re.sub(r"[\s│]+", " ", result.output)
    assert "--ray" in text and "off by default" in text
    assert "Every member holding the cluster token can run code on a pool node" in text
    assert "dedicated to the consortium" in text
    assert "Run as root, the node runs as the OS user consortium-pool" in text
