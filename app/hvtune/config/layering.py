"""Where each training value comes from. Layers, later winning: built-in defaults, the config file, environment
variables `HVTUNE_<KEY>`, command-line flags `--key=value`. Every value remembers its source (default, file:PATH,
env:VAR, flag:--key) and its place for error messages.

`resolve_keys` answers `hvtune config get`: the container entrypoints ask it for resolved values instead of reading
the config file themselves, so the shell and training can never disagree about a key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hvtune.config.schema import TrainConfig
from hvtune.errors import ConfigError, Problem


def read_json(path: Path) -> Any:
    """Read JSON, turning syntax errors into a Problem with line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([Problem(str(path), "(file)", None, f"cannot read: {e.strerror}")]) from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        rule = f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        raise ConfigError([Problem(str(path), "(file)", None, rule)]) from e


def resolve_path(text: str, config_path: Path | None) -> Path:
    """Relative paths resolve against the working directory, like SimpleTuner, then beside the config file."""
    p = Path(text).expanduser()
    if p.is_absolute() or p.exists() or config_path is None:
        return p
    for base in (config_path.parent, config_path.parent.parent):
        if (base / p).exists():
            return base / p
    return p


def _parse_scalar(text: str) -> Any:
    """Env and flag values are strings; JSON gives numbers, booleans, null and lists their types."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_flags(argv: Sequence[str]) -> dict[str, str]:
    flags: dict[str, str] = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError([Problem("command line", arg, None, "config overrides are written --key=value")])
        key, value = arg[2:].split("=", 1)
        flags[key.replace("-", "_")] = value
    return flags


def field_keys() -> dict[str, str]:
    """Every accepted spelling of a training key -> the field name (aliases included)."""
    keys = {}
    for name, info in TrainConfig.model_fields.items():
        keys[name] = name
        if info.alias:
            keys[info.alias] = name
    return keys


@dataclass
class Layers:
    """Raw values by field name, each one's source and its place for error messages, and a notice for every file
    value the environment replaces (a stale .env line must not win silently)."""

    raw: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)

    def set(self, name: str, value: Any, source: str, where: str) -> None:
        self.raw[name], self.sources[name], self.where[name] = value, source, where

    def place(self, fallback: str) -> Callable[[str], str]:
        """key -> where its value came from (`fallback` for a key no layer set)."""
        return lambda key: self.where.get(key, fallback)


def layer_values(path: Path | None, env: Mapping[str, str], argv: Sequence[str]) -> Layers:
    """file < env < flags. An empty HVTUNE_<KEY> counts as unset: compose passes `KEY=` lines of an env file as
    empty strings."""
    keys = field_keys()
    layers = Layers()
    if path is not None:
        data = read_json(path)
        if not isinstance(data, dict):
            raise ConfigError([Problem(str(path), "(file)", type(data).__name__, "must be a JSON object")])
        for key, value in data.items():
            layers.set(keys.get(key, key), value, f"file:{path}", str(path))
    for key, name in keys.items():
        var = f"HVTUNE_{key.upper()}"
        if env.get(var, "") != "":
            value = _parse_scalar(env[var])
            if layers.sources.get(name, "").startswith("file:") and layers.raw[name] != value:
                replaced = layers.raw[name]
                layers.notices.append(
                    f"{name}: {var}={env[var]} (environment, e.g. .env) overrides {replaced!r} from {path}"
                )
            layers.set(name, value, f"env:{var}", var)
    for key, value in _parse_flags(argv).items():
        layers.set(keys.get(key, key), _parse_scalar(value), f"flag:--{key}", f"flag --{key}")
    return layers


def validate_section(model: type, raw: dict[str, Any], where, problems: list[Problem]):
    """Validate; on failure record every error, drop the offending keys and validate again, so the cross-field
    rules still run on what is valid and the user sees every problem in one go."""
    raw = dict(raw)
    for _ in range(3):
        try:
            return model.model_validate(raw)
        except ValidationError as e:
            before = len(raw)
            for err in e.errors():
                key = ".".join(str(p) for p in err["loc"]) or "(object)"
                top = str(err["loc"][0]) if err["loc"] else ""
                if err["type"] == "missing":
                    problems.append(Problem(where(top), key, None, "required, but missing"))
                else:
                    problems.append(Problem(where(top), key, err.get("input"), err["msg"]))
                raw.pop(top, None)
            if len(raw) == before:  # a required key is missing: dropping keys cannot help
                break
    try:
        return model.model_validate({})
    except ValidationError:  # the section has required keys; its problems are recorded, the caller skips it
        return None


def resolve_keys(
    config_path: str | Path | None, names: Sequence[str], *, env: Mapping[str, str] | None = None
) -> list[tuple[str, Any, str]]:
    """(key, value, source) of training keys through the same layers as load_config, without checking the rest of
    the config or the datasets: the container entrypoints ask for the few folders they must check before any work."""
    path = Path(config_path) if config_path else None
    layers = layer_values(path, os.environ if env is None else env, ())
    keys = field_keys()
    unknown = [n for n in names if n not in keys]
    if unknown:
        known = ", ".join(sorted(TrainConfig.model_fields))
        raise ConfigError([Problem("command line", n, None, f"not a training key; one of {known}") for n in unknown])
    fields = [keys[n] for n in names]
    problems: list[Problem] = []
    raw = {f: layers.raw[f] for f in fields if f in layers.raw}
    train = validate_section(TrainConfig, raw, layers.place("defaults"), problems)
    if problems:
        raise ConfigError(problems)
    return [(name, getattr(train, f), layers.sources.get(f, "default")) for name, f in zip(names, fields, strict=True)]
