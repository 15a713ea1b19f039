"""A run's settings as MLflow records them: the resolved config as flat params and as
`config.yaml`, and the tags every training run carries (what it trained, on which data, from
which commit)."""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.utils.git_utils import get_git_commit
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

_log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """Dataclasses, paths, enums and tuples as YAML-safe builtins."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as `section.key` -> string value; lists stay one value."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = "None" if value is None else str(value)
    return flat


def log_config(config: Mapping[str, Any] | Any) -> None:
    """Log the resolved config as flat params and as a `config.yaml` artifact.

    Params make runs comparable in the UI; the YAML file is the exact config to rerun with.
    Values longer than MLflow's 6000-character limit are truncated in the params only.
    """
    plain = _plain(config)
    if not isinstance(plain, dict):
        raise TypeError(f"log_config expects a dict or dataclass, got {type(config).__name__}")
    params = flatten_config(plain)
    for key, value in params.items():
        if len(value) > MAX_PARAM_VAL_LENGTH:
            _log.warning("param %s is %d chars long; truncated (see config.yaml)", key, len(value))
            params[key] = value[: MAX_PARAM_VAL_LENGTH - 3] + "..."
    items = list(params.items())
    for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        mlflow.log_params(dict(items[start : start + MAX_PARAMS_TAGS_PER_BATCH]))
    mlflow.log_dict(plain, "config.yaml")


def git_commit(path: str | os.PathLike[str] | None = None) -> str | None:
    """The checkout's HEAD commit, or None outside a git checkout (never raises)."""
    try:
        return get_git_commit(str(path or os.getcwd()))
    except Exception:
        return None


def standard_tags(
    backbone: str, weights: str, freeze: int | str, dataset_hash: str
) -> dict[str, str]:
    """Run tags every training run carries, so runs can be filtered by what they trained;
    `freeze` as the user wrote it (a depth, or a schedule such as all:2,0@0.5)."""
    tags = {
        "backbone": backbone,
        "weights": weights,
        "freeze": str(freeze),
        "dataset_hash": dataset_hash,
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    return tags
