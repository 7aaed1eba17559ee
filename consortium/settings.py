"""Settings base for both roles: TOML file < environment < command-line flags.

Each role declares one typed model (`coordinator/settings.py`,
`client/settings.py`) and loads it with `load_settings`, passing only the
flags the user actually gave.
"""

from __future__ import annotations

import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
)

from consortium.errors import SettingsError

_TOML_FILE: ContextVar[Path | None] = ContextVar("_TOML_FILE", default=None)

S = TypeVar("S", bound="RoleSettings")


class RoleSettings(BaseSettings):
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: flags, then environment, then the TOML file.
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=_TOML_FILE.get()),
        )


def load_settings(cls: type[S], toml_file: Path | None, **flags: Any) -> S:
    """Build settings; raises SettingsError naming the field and where it came from."""
    if toml_file is not None:
        if not toml_file.is_file():
            raise SettingsError(f"settings file {toml_file} does not exist")
        try:
            tomllib.loads(toml_file.read_text())
        except tomllib.TOMLDecodeError as err:
            raise SettingsError(f"settings file {toml_file} is not valid TOML: {err}") from None
    given = {k: v for k, v in flags.items() if v is not None}
    token = _TOML_FILE.set(toml_file)
    try:
        return cls(**given)
    except ValidationError as err:
        prefix = cls.model_config.get("env_prefix", "")
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise SettingsError(
            "invalid settings (flags, environment "
            f"{prefix}*, or {toml_file or 'no settings file'}): " + "; ".join(problems)
        ) from None
    finally:
        _TOML_FILE.reset(token)
