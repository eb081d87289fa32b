"""Config loading shared by every job: strict pydantic models, YAML, dotted overrides.

`StrictModel` (the base of every config section), `ConfigError`, `load_config` (YAML file <-
`key=value` overrides <- typed values), `config_to_dict`, `config_hash`. The jobs' own
configs live with the jobs: pipeline/data/config.py, pipeline/train/config.py,
sweeps/config.py.

Validation never rewrites a value: a bad or inconsistent value raises, and every problem
is reported in ONE `ConfigError` line naming the dotted key (`image.size: ...`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class StrictModel(BaseModel):
    """Base of every config section: unknown keys and bad assignments raise."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """A config that cannot be loaded or validated; the message is one readable line."""


M = TypeVar("M", bound=BaseModel)
DOTTED_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def parse_override(text: str) -> tuple[str, Any]:
    """`"a.b=3"` -> `("a.b", 3)`; the value is parsed as YAML (`x=` gives None)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not DOTTED_KEY.match(key):
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e})") from None
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `data["a"]["b"] = value` for key "a.b", creating sections as needed."""
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise ConfigError(f"override {key}: {prefix} is a value, not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(
    cls: type[M],
    path: str | Path | None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
) -> M:
    """Build `cls` from a YAML file, then `key=value` overrides, then typed `values`.

    `values` maps dotted keys to already-typed values (e.g. CLI flags such as a path, which
    must not be YAML-parsed: `--input yes` is the folder "yes", not True). Later wins.
    """
    data = read_yaml(path) if path is not None else {}
    for text in overrides:
        set_dotted(data, *parse_override(text))
    for key, value in (values or {}).items():
        set_dotted(data, key, value)
    return validate(cls, data, "invalid config" + (f" ({path})" if path is not None else ""))


def validate(cls: type[M], data: Mapping[str, Any], context: str) -> M:
    """`cls` from plain data, or one ConfigError line `context: dotted.key: message; ...`."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{context}: {format_errors(e, cls)}") from None


def format_errors(error: ValidationError, cls: type[BaseModel]) -> str:
    """pydantic's errors as `dotted.key: message` joined by "; " (one line)."""
    parts = []
    for err in error.errors():
        loc = [str(x) for x in err["loc"]]
        key = ".".join(loc) or "<root>"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            known = _known_keys(cls, loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            if close:
                msg += f" (did you mean {'.'.join([*loc[:-1], close[0]])}?)"
            elif known:
                msg += f" (known: {', '.join(sorted(known))})"
        elif err["type"] == "missing":
            msg = "required"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and not isinstance(err["input"], dict | list):
                msg += f", got {err['input']!r}"
        parts.append(f"{key}: {msg}")
    return "; ".join(parts)


def _known_keys(cls: type[BaseModel], loc: Sequence[str]) -> list[str]:
    """Field names of the (nested) model section at `loc`, [] if it is not a model."""
    model: Any = cls
    for name in loc:
        field = model.model_fields.get(name) if _is_model(model) else None
        if field is None:
            return []
        model = field.annotation
    return list(model.model_fields) if _is_model(model) else []


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """JSON-compatible dict of a config (what gets saved with every output)."""
    return cfg.model_dump(mode="json")


def config_hash(cfg: BaseModel, exclude: set[str] | None = None) -> str:
    """sha256 (hex) of the canonical JSON of `cfg` without the top-level keys `exclude`."""
    data = {k: v for k, v in config_to_dict(cfg).items() if k not in (exclude or set())}
    canon = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()
