"""load_settings with CoordinatorSettings: TOML file < environment < flags."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from consortium.errors import SettingsError
from consortium.settings import load_settings
from coordinator.settings import CoordinatorSettings

ENV_PREFIX = "CONSORTIUM_COORDINATOR_"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CONSORTIUM_COORDINATOR_* from the machine running the tests leaks in."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return path


def test_load_settings_no_sources_gives_defaults() -> None:
    settings = load_settings(CoordinatorSettings, None)
    assert settings == CoordinatorSettings()
    assert settings.superlink_port == 0
    assert settings.listen_address == "127.0.0.1:0"
    assert settings.insecure is False
    assert settings.data_dir == Path(".consortium")


def test_load_settings_toml_file_values_used(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        'superlink_port = 7000\nlisten_address = "127.0.0.1:5555"\n'
        "insecure = true\nnode_timeout_s = 3.5\n",
    )
    settings = load_settings(CoordinatorSettings, path)
    assert settings.superlink_port == 7000
    assert settings.listen_address == "127.0.0.1:5555"
    assert settings.insecure is True
    assert settings.node_timeout_s == 3.5
    assert settings.heartbeat_interval_s == 2.0  # not in the file: default


def test_load_settings_environment_overrides_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_toml(tmp_path, 'superlink_port = 7000\nlisten_address = "127.0.0.1:5555"\n')
    monkeypatch.setenv(f"{ENV_PREFIX}SUPERLINK_PORT", "8000")
    settings = load_settings(CoordinatorSettings, path)
    assert settings.superlink_port == 8000
    assert settings.listen_address == "127.0.0.1:5555"  # only in the file


def test_load_settings_flags_override_environment_and_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_toml(tmp_path, "superlink_port = 7000\nnode_timeout_s = 4.0\n")
    monkeypatch.setenv(f"{ENV_PREFIX}SUPERLINK_PORT", "8000")
    monkeypatch.setenv(f"{ENV_PREFIX}NODE_TIMEOUT_S", "5.0")
    settings = load_settings(CoordinatorSettings, path, superlink_port=9000)
    assert settings.superlink_port == 9000  # flag beats env and file
    assert settings.node_timeout_s == 5.0  # env beats file


def test_load_settings_flags_override_toml_without_environment(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "insecure = false\n")
    settings = load_settings(CoordinatorSettings, path, insecure=True)
    assert settings.insecure is True


def test_load_settings_none_flags_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_toml(tmp_path, 'listen_address = "127.0.0.1:5555"\n')
    monkeypatch.setenv(f"{ENV_PREFIX}SUPERLINK_PORT", "8000")
    settings = load_settings(
        CoordinatorSettings, path, listen_address=None, superlink_port=None, data_dir=None
    )
    assert settings.listen_address == "127.0.0.1:5555"
    assert settings.superlink_port == 8000
    assert settings.data_dir == Path(".consortium")


def test_load_settings_false_flag_is_not_ignored(tmp_path: Path) -> None:
    # Only None means "not given"; False and 0 are real values.
    path = write_toml(tmp_path, "insecure = true\nsuperlink_port = 7000\n")
    settings = load_settings(CoordinatorSettings, path, insecure=False, superlink_port=0)
    assert settings.insecure is False
    assert settings.superlink_port == 0


def test_load_settings_environment_parses_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}INSECURE", "true")
    monkeypatch.setenv(f"{ENV_PREFIX}DATA_DIR", "/srv/consortium")
    monkeypatch.setenv(f"{ENV_PREFIX}HEARTBEAT_INTERVAL_S", "0.25")
    settings = load_settings(CoordinatorSettings, None)
    assert settings.insecure is True
    assert settings.data_dir == Path("/srv/consortium")
    assert settings.heartbeat_interval_s == 0.25
    assert settings.state_path == Path("/srv/consortium/state.db")


def test_load_settings_other_role_environment_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSORTIUM_CLIENT_SUPERLINK_PORT", "1234")
    monkeypatch.setenv("SUPERLINK_PORT", "4321")
    assert load_settings(CoordinatorSettings, None).superlink_port == 0


def test_load_settings_invalid_toml_raises(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "superlink_port = [\n")
    with pytest.raises(SettingsError, match="not valid TOML") as excinfo:
        load_settings(CoordinatorSettings, path)
    assert str(path) in str(excinfo.value)


def test_load_settings_port_out_of_range_in_toml_names_field(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "superlink_port = 70000\n")
    with pytest.raises(SettingsError) as excinfo:
        load_settings(CoordinatorSettings, path)
    message = str(excinfo.value)
    assert "superlink_port" in message
    assert "65535" in message
    assert str(path) in message


def test_load_settings_unknown_key_in_toml_names_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "superlink_prot = 7000\n")
    with pytest.raises(SettingsError, match="superlink_prot"):
        load_settings(CoordinatorSettings, path)


def test_load_settings_bad_environment_value_names_field_and_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}SUPERLINK_PORT", "not-a-port")
    with pytest.raises(SettingsError) as excinfo:
        load_settings(CoordinatorSettings, None)
    assert "superlink_port" in str(excinfo.value)
    assert ENV_PREFIX in str(excinfo.value)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("superlink_port", 70000),
        ("superlink_port", -1),
        ("heartbeat_interval_s", 0),
        ("node_timeout_s", -1.0),
    ],
)
def test_load_settings_bad_flag_value_names_field(flag: str, value: object) -> None:
    with pytest.raises(SettingsError, match=flag):
        load_settings(CoordinatorSettings, None, **{flag: value})


def test_load_settings_unknown_flag_names_it() -> None:
    with pytest.raises(SettingsError, match="no_such_flag"):
        load_settings(CoordinatorSettings, None, no_such_flag=1)


def test_load_settings_flag_fixes_bad_toml_value(tmp_path: Path) -> None:
    # The flag wins, so the bad file value is never used.
    path = write_toml(tmp_path, "superlink_port = 70000\n")
    assert load_settings(CoordinatorSettings, path, superlink_port=7000).superlink_port == 7000


def test_load_settings_missing_file_raises(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(SettingsError, match="does not exist") as excinfo:
        load_settings(CoordinatorSettings, missing)
    assert str(missing) in str(excinfo.value)


def test_load_settings_directory_as_file_raises(tmp_path: Path) -> None:
    with pytest.raises(SettingsError):
        load_settings(CoordinatorSettings, tmp_path)


def test_load_settings_file_only_applies_to_its_own_call(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "superlink_port = 7000\n")
    assert load_settings(CoordinatorSettings, path).superlink_port == 7000
    assert load_settings(CoordinatorSettings, None).superlink_port == 0


def test_coordinator_settings_derived_paths_under_data_dir(tmp_path: Path) -> None:
    settings = load_settings(CoordinatorSettings, None, data_dir=tmp_path)
    assert settings.state_path == tmp_path / "state.db"
    assert settings.address_file == tmp_path / "coordinator.address"
    assert settings.models_dir == tmp_path / "models"
    assert settings.logs_dir == tmp_path / "logs"
