"""Resolving a config: defaults, then a YAML file, then `section.key=value` overrides, checked.

A config is validated here, before any cluster resource is taken, and saved with the run
(MLflow `config.yaml`), so the same run can be started again with `--config config.yaml`.
Nothing here imports torch: `--print-config` and `--help` answer at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from tlray.config import schedule
from tlray.config.augmentation import AUTO
from tlray.config.augmentation import from_config as augmentation_from_config
from tlray.config.interval import parse_budget, parse_every
from tlray.config.settings import Config, all_settings, sections
from tlray.errors import TlrayError


def from_dict(values: dict[str, Any] | None, base: Config | None = None) -> Config:
    """A Config from nested dicts (e.g. parsed YAML); unknown keys are an error."""
    config = copy(base) if base else Config()
    for key, value in (values or {}).items():
        _set(config, key, value, origin="config")
    return config


def load(path: str | Path | None = None, overrides: list[str] | None = None,
         base: Config | None = None) -> Config:
    """Resolves a config: defaults (or `base`), then a YAML file, then `section.key=value`s."""
    config = copy(base) if base else Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise TlrayError(f"--config {path}: no such file")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise TlrayError(f"--config {path}: not valid YAML ({e})") from None
        if not isinstance(values, dict):
            raise TlrayError(f"--config {path}: expected a mapping of sections")
        config = from_dict(values, config)
    for item in overrides or []:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep:
            raise TlrayError(f"override {item!r}: expected --section.key=value")
        _set(config, key, parse_value(value), origin="override")
    validate(config)
    return config


def with_overrides(config: Config, **values: Any) -> Config:
    """A validated copy of `config` with `section.key` values given as keyword arguments
    (`with_overrides(cfg, **{"data.dataset": uri})`)."""
    out = copy(config)
    for key, value in values.items():
        _set(out, key, value, origin="override")
    return validate(out)


def parse_value(text: str) -> Any:
    """A YAML scalar/list/mapping (`3e-4`, `true`, `[0, 1]`), else the text itself (`0,3,all`)."""
    if text == "":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def validate(config: Config) -> Config:
    """Checks values that types alone do not catch, before any resource is reserved."""
    for key, f, _ in all_settings():
        choices = f.metadata.get("choices")
        value = _get(config, key)
        if choices and value not in choices:
            raise TlrayError(f"--{key}: expected one of {', '.join(choices)}, got {value!r}")
    d, m, o, t, s, u = (config.data, config.model, config.optim, config.train, config.scaling,
                        config.tune)
    checks = [
        (d.image_size >= 8, "data.image_size", "an int >= 8", d.image_size),
        (d.batch_size >= 1, "data.batch_size", "an int >= 1", d.batch_size),
        (d.cache_gb >= 0, "data.cache_gb", "a number >= 0 (0: never cache)", d.cache_gb),
        (0 <= m.drop_rate < 1, "model.drop_rate", "a value in [0, 1)", m.drop_rate),
        (o.lr > 0 and math.isfinite(o.lr), "optim.lr", "a positive number", o.lr),
        (o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay),
        (o.warmup_epochs >= 0, "optim.warmup_epochs", "a number >= 0", o.warmup_epochs),
        (0 <= o.label_smoothing < 1, "optim.label_smoothing", "a value in [0, 1)",
         o.label_smoothing),
        (o.layer_decay is None or 0 < o.layer_decay <= 1, "optim.layer_decay",
         "a value in (0, 1]", o.layer_decay),
        (t.epochs >= 1, "train.epochs", "an int >= 1", t.epochs),
        (t.patience is None or t.patience >= 1, "train.patience", "an int >= 1", t.patience),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints", "an int >= 1", t.keep_checkpoints),
        (s.min_workers >= 1, "scaling.num_workers", "an int >= 1, or MIN-MAX", s.num_workers),
        (s.cpus_per_worker > 0, "scaling.cpus_per_worker", "a number > 0", s.cpus_per_worker),
        (s.gpus_per_worker is None or s.gpus_per_worker > 0, "scaling.gpus_per_worker",
         "a number > 0", s.gpus_per_worker),
        (s.max_failures >= -1, "scaling.max_failures", "an int >= 0, or -1 for no limit",
         s.max_failures),
        (s.max_preemptions >= -1, "scaling.max_preemptions",
         "an int >= 0, or -1 for no limit", s.max_preemptions),
        (s.notice_check_every >= 1, "scaling.notice_check_every", "an int >= 1",
         s.notice_check_every),
        (s.grow_check_every >= 0, "scaling.grow_check_every", "a number of seconds >= 0",
         s.grow_check_every),
        (u.num_samples >= 1, "tune.num_samples", "an int >= 1", u.num_samples),
        (_lr_range_ok(u.lr_min, u.lr_max), "tune.lr_min/lr_max",
         "0 < lr_min <= lr_max, or auto", (u.lr_min, u.lr_max)),
        (u.grace_period >= 1, "tune.grace_period", "an int >= 1", u.grace_period),
        (u.reduction_factor >= 2, "tune.reduction_factor", "an int >= 2", u.reduction_factor),
        (u.max_concurrent >= 0, "tune.max_concurrent", "an int >= 0", u.max_concurrent),
        (u.trials_per_gpu >= 0, "tune.trials_per_gpu", "an int >= 0 (0: auto)",
         u.trials_per_gpu),
    ]
    for ok, key, expected, got in checks:
        if not ok:
            raise TlrayError(f"--{key}: expected {expected}, got {got!r}")
    augmentation_from_config(d, "none" if d.augment == AUTO else None)  # overrides in range
    schedule.parse(m.freeze, t.epochs)  # a depth, or phases that fit train.epochs
    parse_every(t.checkpoint_every)
    parse_budget(u.budget)  # a bad budget fails here, before Ray starts
    if t.ema is not None and not 0 < t.ema < 1:
        raise TlrayError(f"--train.ema: expected a decay in (0, 1), e.g. 0.999, got {t.ema!r}")
    return config


def _lr_range_ok(low, high) -> bool:
    if isinstance(low, str) or isinstance(high, str):
        return all(v == "auto" or isinstance(v, float) and v > 0 for v in (low, high))
    return 0 < low <= high


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def copy(config: Config) -> Config:
    return from_plain(config.to_dict())


def from_plain(values: dict[str, Any]) -> Config:
    """Rebuilds a Config from `to_dict()` output (e.g. after it crossed a process boundary)."""
    kinds = sections()
    return Config(**{name: kinds[name](**value) if kinds[name] else value
                     for name, value in values.items()})


def _get(config: Config, key: str) -> Any:
    head, _, rest = key.partition(".")
    section = getattr(config, head)
    return getattr(section, rest) if rest else section


def _set(config: Config, key: str, value: Any, origin: str) -> None:
    """Sets `section.key` (or a nested dict of them) with type checking and suggestions."""
    kinds = sections()
    head, _, rest = key.partition(".")
    if head not in kinds:
        raise TlrayError(_unknown(origin, key, head, list(kinds)))
    section_type = kinds[head]
    if section_type is None:  # a top-level scalar such as storage_path
        if rest:
            raise TlrayError(f"{origin} {key!r}: {head} has no sub-keys")
        f = next(f for f in dataclasses.fields(Config) if f.name == head)
        setattr(config, head, _coerce(value, f.type, key))
        return
    section = getattr(config, head)
    if not rest:
        if not isinstance(value, dict):
            raise TlrayError(f"{origin} {key!r}: expected a mapping of {head} settings")
        for sub, sub_value in value.items():
            _set(config, f"{head}.{sub}", sub_value, origin)
        return
    fields = {f.name: f for f in dataclasses.fields(section_type)}
    if rest not in fields:
        raise TlrayError(_unknown(origin, key, rest, [f"{head}.{n}" for n in fields],
                                  prefix=f"{head}."))
    setattr(section, rest, _coerce(value, fields[rest].type, key))


def _unknown(origin: str, key: str, name: str, known: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(prefix + name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
    return f"{origin} {key!r}: unknown setting{hint}"


def _union_args(annotation: Any) -> tuple:
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation
    return typing.get_args(hint)


def field_type(annotation: Any) -> tuple[type, bool]:
    """(the base type, whether None is allowed) of a field's annotation."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation
    args = typing.get_args(hint)
    optional = type(None) in args or isinstance(hint, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    return base, optional


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Converts YAML/CLI values to the field's declared type, or explains the mismatch."""
    base, optional = field_type(annotation)
    if base in (int, float) and str in _union_args(annotation) and isinstance(value, str):
        try:
            return base(value)
        except ValueError:
            return value  # a word ("auto") or a range ("1-4"): validate() says if it is one
    if optional and base is not str and isinstance(value, str) and value.lower() in (
            "none", "null"):
        value = None  # `--train.ema none` turns off what a preset turned on
    if value is None:
        if optional:
            return None
        raise TlrayError(f"--{key}: a value is required")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            return str(value)
        if base is dict:
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise TlrayError(f"--{key}: expected {getattr(base, '__name__', base)}, got {value!r}")
