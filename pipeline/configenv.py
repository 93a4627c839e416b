"""Config keys from environment variables: how containers are configured.

``SALKA__SECTION__KEY=value`` sets ``section.key``: a double underscore separates levels, names are
case-insensitive (``SALKA__MODEL__RNN__HIDDEN_SIZE=64`` is ``model.rnn.hidden_size``) and values are
read like ``--set`` values (YAML: ``3600`` is a number, ``[a, b]`` a list, anything else a string).
Under ``kafka`` the rest of the name is one librdkafka key with single underscores read as dots:
``SALKA__KAFKA__BOOTSTRAP_SERVERS`` is ``kafka."bootstrap.servers"``.

``KAFKA_BOOTSTRAP_SERVERS`` keeps working as ``kafka.bootstrap.servers``, below
``SALKA__KAFKA__BOOTSTRAP_SERVERS``; its use is logged once.

Precedence: config file < environment < ``--set``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config, ConfigError, config_from_dict, parse_override, parse_value
from pipeline.safetext import printable

log = logging.getLogger(__name__)

PREFIX = "SALKA__"
LEGACY_BOOTSTRAP = "KAFKA_BOOTSTRAP_SERVERS"
_logged: set[str] = set()  # variables whose use was logged in this process


@dataclass(frozen=True)
class EnvSetting:
    variable: str
    path: tuple[str, ...]  # ("kafka", "bootstrap.servers"), ("model", "kind")
    value: Any

    @property
    def key(self) -> str:
        return ".".join(self.path)


def key_path(variable: str) -> tuple[str, ...]:
    """``SALKA__MODEL__RNN__CELL`` -> ("model", "rnn", "cell"); under kafka, the rest is one key."""
    parts = variable[len(PREFIX):].lower().split("__")
    if not all(parts):
        raise ConfigError(f"environment variable {variable}: expected {PREFIX}SECTION__KEY "
                          f"(levels separated by a double underscore, none empty)")
    if parts[0] == "kafka":
        if len(parts) < 2:
            raise ConfigError(f"environment variable {variable}: expected {PREFIX}KAFKA__<librdkafka "
                              f"key>, e.g. {PREFIX}KAFKA__BOOTSTRAP_SERVERS")
        return ("kafka", ".".join(parts[1:]).replace("_", "."))
    return tuple(parts)


def env_settings(environ: Mapping[str, str]) -> list[EnvSetting]:
    """The config settings ``environ`` holds, in the order they apply (later wins)."""
    found = []
    if environ.get(LEGACY_BOOTSTRAP):  # a plain string, not YAML: "host:9092,host2:9092"
        found.append(EnvSetting(LEGACY_BOOTSTRAP, ("kafka", "bootstrap.servers"),
                                environ[LEGACY_BOOTSTRAP]))
    for variable in sorted(v for v in environ if v.startswith(PREFIX)):
        found.append(EnvSetting(variable, key_path(variable), parse_value(environ[variable])))
    for variable in sorted(environ):
        # Levels after SALKA but not the prefix: a config key mistyped, not one of click's
        # SALKA_<COMMAND>_<OPTION> (single underscores only). Silently ignored before.
        upper = variable.upper()
        if upper.startswith("SALKA_") and "__" in upper and not variable.startswith(PREFIX):
            fixed = PREFIX + upper.split("_", 1)[1].lstrip("_")
            why = ("names are read in capitals" if upper.startswith(PREFIX)
                   else "two underscores after SALKA")
            raise ConfigError(f"environment variable {printable(variable)}: config keys are "
                              f"{PREFIX}SECTION__KEY ({why}), e.g. {printable(fixed)}")
    return found


def variable_for(path: tuple[str, ...], environ: Mapping[str, str]) -> str | None:
    """The environment variable that sets the config key ``path``, if one does."""
    for setting in reversed(env_settings(environ)):
        if setting.path == path:
            return setting.variable
    return None


def apply_settings(data: dict, settings: list[EnvSetting]) -> dict:
    data = copy.deepcopy(data)
    for setting in settings:
        node = data
        for depth, part in enumerate(setting.path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment variable {setting.variable}: "
                                  f"{'.'.join(setting.path[: depth + 1])} is not a section")
            node = child
        node[setting.path[-1]] = setting.value
    return data


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _blame(exc: ConfigError, settings: list[EnvSetting], overrides: list[str] | tuple[str, ...]) -> str:
    """The error, naming the environment variable that set the key when one did (and no --set
    overrode it), so the user knows where to fix it."""
    message = str(exc)
    failed = message.split(":", 1)[0].split("[", 1)[0]
    set_keys = []
    for text in overrides:
        try:
            parts, _ = parse_override(text)
        except ConfigError:  # the --set itself is wrong: the message already says so
            return message
        set_keys.append("kafka." + ".".join(parts[1:]) if parts[0] == "kafka" else ".".join(parts))
    if any(_related(failed, key) for key in set_keys):
        return message
    for setting in reversed(settings):
        if _related(failed, setting.key):
            return f"{message} (set by the environment variable {setting.variable})"
    return message


def apply_environment(data: dict, overrides: list[str] | tuple[str, ...],
                      environ: Mapping[str, str]) -> Config:
    """``data`` (the config file) < ``environ`` < ``overrides`` (--set), validated."""
    settings = env_settings(environ)
    try:
        config = config_from_dict(apply_settings(data, settings), overrides)
    except ConfigError as exc:
        raise ConfigError(_blame(exc, settings, overrides)) from exc
    legacy = environ.get(LEGACY_BOOTSTRAP)
    if legacy and config.kafka.get("bootstrap.servers") == legacy and LEGACY_BOOTSTRAP not in _logged:
        _logged.add(LEGACY_BOOTSTRAP)
        log.info("kafka.bootstrap.servers=%s from the environment variable %s", legacy,
                 LEGACY_BOOTSTRAP)
    return config
