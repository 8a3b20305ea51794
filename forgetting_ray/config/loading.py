"""A YAML file and dotted CLI overrides in, a validated :class:`PipelineConfig` out; and back to YAML."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .base import ConfigError
from .pipeline import PipelineConfig


def _format_validation_error(err: ValidationError, origin: str) -> str:
    """One line (the CLI prints it after ``error:``): the origin, then each bad field with its value."""
    problems = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            near = _near_field(e["loc"])
            msg = "unknown field (typo?" + (f" did you mean {near!r}?)" if near else ")")
        elif not isinstance(e.get("input"), (dict, list, type(None))) and str(e["input"]) not in msg:
            msg += f" (got {e['input']!r})"  # a wrong type from the command line arrives as a string
        problems.append(f"{path}: {msg}")
    return f"invalid configuration in {origin}: " + "; ".join(problems)


def _near_field(loc: tuple[Any, ...]) -> str | None:
    """The known field closest to the unknown last part of ``loc`` (sections walked from PipelineConfig)."""
    import difflib

    model: Any = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    names = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    return close[0] if close else None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'training.lr=2e-5'`` -> (['training', 'lr'], 2e-5); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty field name")
    return parts, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {p} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML file (or defaults when ``path`` is None), apply dotted overrides, validate."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded
    if overrides:
        raw = apply_overrides(raw, overrides)
        origin += " (with overrides " + ", ".join(overrides) + ")"
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from None


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return json.loads(cfg.model_dump_json(by_alias=True))


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'training.lr': 1e-4, ...} (used for MLflow params and the docs)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
