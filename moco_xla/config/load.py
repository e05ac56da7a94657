"""A config from YAML plus ``--set key=value`` overrides: unknown keys get a did-you-mean, values are
coerced to the field's type, and the result is validated (checks.py)."""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from .checks import validate
from .schema import (CheckpointConfig, Config, DataConfig, DistillConfig, EvalConfig, LabelPropConfig, MocoConfig,
                     ModelConfig, ProbeConfig, SelectConfig, SemisupConfig, TrainConfig)

# The named configs ship inside the package (moco_xla/configs/), so `--config NAME` works from any
# working directory and from a wheel; files on disk are a regular install's, hence a Path.
CONFIG_DIR = Path(str(importlib.resources.files("moco_xla").joinpath("configs")))
DEFAULT_CONFIG = "digits"


def config_path(name_or_path: str | None) -> Path:
    """A config name (``digits``: the packaged moco_xla/configs/digits.yaml) or a path to a YAML file.

    A path that does not exist but reads ``configs/NAME.yaml`` (how commands written for the
    source tree name the packaged configs) resolves to the packaged config NAME.
    """
    name_or_path = name_or_path or DEFAULT_CONFIG
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if p.is_file():
            return p
        packaged = CONFIG_DIR / p.name
        if p.parent.name == "configs" and packaged.is_file():
            return packaged
        raise UserError(f"config file {p} does not exist")
    p = CONFIG_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
        raise UserError(f"unknown config {name_or_path!r}; valid: {', '.join(names)} or a .yaml path")
    return p


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate. Raises UserError."""
    path = config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if raw is None or raw == {}:
        names = ", ".join(f.name for f in dataclasses.fields(Config) if f.name != "name")
        raise UserError(f"config {path} is empty; it needs at least one of the sections {names} "
                        f"(see moco_xla/configs/digits.yaml)")
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    cfg = from_dict(raw)
    for item in overrides or []:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


def from_dict(raw: dict) -> Config:
    cfg = Config()
    for key, value in raw.items():
        _set(cfg, key, value)
    return cfg


def apply_override(cfg: Config, item: str) -> None:
    """``section.key=value``; the value is parsed as YAML (numbers, booleans, lists)."""
    if "=" not in item:
        raise UserError(f"--set {item!r} must look like section.key=value (e.g. train.lr=0.03)")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    _set(cfg, key.strip(), value)


def _set(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            prefix = ".".join(parts[:i])
            full = [f"{prefix}.{n}" if prefix else n for n in names]
            guess = difflib.get_close_matches(".".join(parts[: i + 1]), full, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else f"; valid: {', '.join(full)}"
            raise UserError(f"unknown config key {dotted!r}{hint}")
        f = next(f for f in dataclasses.fields(obj) if f.name == part)
        current = getattr(obj, part)
        if dataclasses.is_dataclass(current):
            if i == len(parts) - 1:
                if not isinstance(value, dict):
                    raise UserError(f"config section {dotted!r} must be a mapping")
                for k, v in value.items():
                    _set(cfg, f"{dotted}.{k}", v)
                return
            obj = current
            continue
        if i != len(parts) - 1:
            raise UserError(f"config key {'.'.join(parts[: i + 1])!r} is not a section")
        setattr(obj, part, _coerce(dotted, value, f, current))
        return


def _coerce(key: str, value: Any, f: dataclasses.Field, current: Any) -> Any:
    typ = typing.get_type_hints(_owner(f))[f.name]
    optional = typing.get_origin(typ) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(typ) if a is not type(None)] if optional else [typ]
    if value is None:
        if optional:
            return None
        raise UserError(f"config key {key!r} needs a value of type {args[0].__name__}")
    want = args[0]
    if want is bool:
        if isinstance(value, bool):
            return value
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 5e-4 as a string
            except ValueError:
                pass
    elif want is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif want is list or typing.get_origin(want) is list:
        if isinstance(value, list):
            return value
    else:
        return value
    raise UserError(f"config key {key!r} must be {want.__name__}, got {value!r}")


_OWNERS: dict[int, type] = {}


def _owner(f: dataclasses.Field) -> type:
    if not _OWNERS:
        for cls in (Config, DataConfig, ModelConfig, MocoConfig, TrainConfig, EvalConfig, CheckpointConfig,
                    ProbeConfig, SemisupConfig, DistillConfig, LabelPropConfig, SelectConfig):
            for g in dataclasses.fields(cls):
                _OWNERS[id(g)] = cls
    return _OWNERS[id(f)]


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
