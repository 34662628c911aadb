"""Typed configs loaded from TOML, with dotted command-line overrides.

A config is a ``ConfigModel`` (pydantic) whose every field carries a docstring; the docstrings
become the field descriptions shown by ``bazaar config show``, and a test checks none is missing.
``load_config(Model, path, ["--heartbeat.interval_s=1"])`` reads the file, applies overrides
(``--a.b=value`` or ``--a.b value``; values parse as TOML, so ``1``, ``true``, ``[1, 2]`` and
bare strings all work), validates, and turns every problem into a ``ConfigError`` that names the
key and where it came from — an unknown key is never silently ignored.

>>> class Demo(ConfigModel):
...     port: int = 1
...     '''TCP port.'''
>>> load_config(Demo, None, ["--port", "8"]).port
8
>>> load_config(Demo, None, ["--prot=8"])
Traceback (most recent call last):
...
protocol.errors.ConfigError: command line: unknown key 'prot' (known keys: port)
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from protocol.codec import read_toml
from protocol.errors import ConfigError

C = TypeVar("C", bound="ConfigModel")


class ConfigModel(BaseModel):
    """Base of every config: unknown keys are errors, attribute docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


def data_dir() -> Path:
    """Where a node keeps identity, database, adapters and payloads: ``$BAZAAR_HOME`` or
    ``~/.bazaar``."""
    return Path(os.environ.get("BAZAAR_HOME") or Path.home() / ".bazaar").expanduser()


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--a.b=1", "--c", "x"]`` → ``{"a.b": 1, "c": "x"}``."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"command line: expected --key=value or --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: --{key} needs a value")
            i += 1
            value = args[i]
        out[key.replace("-", "_")] = _parse_value(value)
        i += 1
    return out


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"command line: --{dotted}: '{part}' is not a section")
        node = child
    node[leaf] = value


def load_config(model: type[C], path: Path | None, overrides: list[str] | None = None) -> C:
    """Read ``path`` (if given), apply overrides, validate into ``model``."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        data = read_toml(path)
    from_cli = parse_overrides(overrides or [])
    # a section given in part (``--a.b.x=1``, or ``[a.b] x = 1``) keeps its other defaults
    data = _merged(_defaults(model), data)
    for dotted, value in from_cli.items():
        _set_dotted(data, dotted, value)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, model, source, set(from_cli))) from None


def _defaults(model: type[BaseModel]) -> dict[str, Any]:
    """The model's defaults, nested sections included ({} if a field has none)."""
    try:
        return model().model_dump()
    except ValidationError:
        return {}


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def _explain(err: ValidationError, model: type[BaseModel], source: str, cli: set[str]) -> str:
    lines = []
    for item in err.errors():
        dotted = ".".join(str(p) for p in item["loc"])
        from_cli = any(k == dotted or k.startswith(dotted + ".") for k in cli)
        where = "command line" if from_cli else source
        if item["type"] == "extra_forbidden":
            known = ", ".join(_known_keys(model, item["loc"][:-1]))
            lines.append(f"{where}: unknown key '{dotted}' (known keys: {known})")
        else:
            lines.append(f"{where}: {dotted}: {item['msg']}")
    return "\n".join(lines)


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def describe(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted key, type, description)`` for every field, nested sections flattened."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe(ann, f"{prefix}{name}."))
        else:
            type_name = getattr(ann, "__name__", str(ann))
            rows.append((f"{prefix}{name}", type_name, field.description or ""))
    return rows
