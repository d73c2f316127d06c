"""Where a flag's value comes from when the command line does not give it.

Order, first found wins: the flag, an `SGJAX_<FLAG>` environment variable (`SGJAX_MODEL_PATH`,
`SGJAX_MAX_RUNNING_REQUESTS`), the YAML file of `--config` (or `SGJAX_CONFIG`), the field's default.
A value from the environment or a file is converted as its flag would be, and one the flag would refuse is
an error that names where it came from. `config.add_arguments` builds the flags with these.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping
from typing import Any

import yaml

ENV_PREFIX = "SGJAX_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# A field whose name has one of these is shown masked when the configuration is logged.
SECRET_WORDS = ("key", "token", "secret", "password")
MASK = "***"


class ConfigError(ValueError):
    """A value from the environment or a config file that its flag would not take."""


def env_name(dest: str) -> str:
    """The environment variable of a flag: `max_running_requests` -> `SGJAX_MAX_RUNNING_REQUESTS`."""
    return ENV_PREFIX + dest.upper()


def convert(value: Any, kind: type, choices: Collection | None, where: str) -> Any:
    """`value` (a string from the environment, or what YAML read) as a flag of type `kind` takes it;
    `where` names the value's source in the error."""
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            value = value.strip().lower() in TRUE_WORDS
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: expected true or false (or 1/0, yes/no, on/off)")
        return value
    if isinstance(value, bool) or isinstance(value, (dict, list)) or value is None:
        raise ConfigError(f"{where}={value!r}: expected {kind.__name__}")
    try:
        converted = kind(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise ConfigError(f"{where}={value!r}: expected {kind.__name__}") from None
    if kind is int and isinstance(value, float) and value != converted:
        raise ConfigError(f"{where}={value!r}: expected int")
    if choices is not None and converted not in choices:
        raise ConfigError(f"{where}={value!r}: expected one of {', '.join(map(str, choices))}")
    return converted


def from_environment(dest: str, kind: type, choices: Collection | None,
                     environ: Mapping[str, str] = os.environ) -> tuple[bool, Any]:
    """(whether SGJAX_<DEST> is set, its converted value)."""
    name = env_name(dest)
    if name not in environ:
        return False, None
    return True, convert(environ[name], kind, choices, name)


def load_config_file(path: str) -> dict[str, Any]:
    """The options a YAML file sets, keyed by field name (`max-running-requests` and
    `max_running_requests` both name the field)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value, not {type(data).__name__}")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def is_secret(name: str) -> bool:
    return any(word in name.lower() for word in SECRET_WORDS)


def describe(*configs: Any) -> str:
    """The fields of these dataclasses as `name=value`, secrets masked: for the start-up log."""
    parts = []
    for config in configs:
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            shown = MASK if is_secret(f.name) and value not in (None, "") else repr(value)
            parts.append(f"{f.name}={shown}")
    return " ".join(parts)
