"""The model registry: versions, the `@champion` alias, and what a person reads to choose.

A sweep registers its tested winner as a new version of `<dataset>-<backbone>`; the alias
`champion` moves to it only if its test metric beats the current champion's. Every version
carries plain tags (`test_acc`, `val_acc`, `backbone`, `freeze`, `lr`, ...) that the
MLflow UI lists and filters, and a description (Markdown, rendered in the UI) that says what
was trained on what, how it scored, why the alias moved or stayed, and how to load and serve
it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from tlray.errors import TlrayError
from tlray.track.store import configure
from tlray.track.metrics import is_better

_log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"


def default_registered_name(dataset_name: str, backbone: str) -> str:
    """`<dataset>-<backbone>` with characters the registry rejects (`/`, `:`) replaced."""
    name = f"{dataset_name}-{backbone}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    if not dataset_name.strip() or not backbone.strip() or not name:
        raise TlrayError(
            f"cannot build a registered model name from dataset {dataset_name!r} and backbone "
            f"{backbone!r}: expected non-empty names"
        )
    return name


@dataclasses.dataclass(frozen=True)
class RegistrationResult:
    """What `register_champion` did."""

    version: int
    """The version just registered."""
    champion_version: int | None
    """The version `@champion` points to afterwards."""
    moved: bool
    """Whether `@champion` now points to the new version."""
    previous: tuple[int, float] | None = None
    """The champion before: (version, its metric, NaN if it has none), or None."""


def _champion_metric(client: MlflowClient, name: str, metric: str) -> tuple[int, float] | None:
    """(version, its test metric or NaN) of the current champion, None if there is none.

    Versions registered before the tags had plain names carry `test_<metric>` instead.
    """
    version = client.get_registered_model(name).aliases.get(CHAMPION_ALIAS)
    if version is None:
        return None
    tags = client.get_model_version(name, str(version)).tags
    raw = tags.get(metric, tags.get(f"test_{metric}"))
    try:
        return int(version), float(raw) if raw is not None else math.nan
    except ValueError:
        return int(version), math.nan


def register_champion(
    model_uri: str,
    registered_name: str,
    metric_name: str,
    metric_value: float,
    mode: str = "max",
    tags: Mapping[str, Any] | None = None,
) -> RegistrationResult:
    """Register a new version and move `@champion` to it only if its test metric is better.

    Every version keeps its test metric as the tag `metric_name` (e.g. `test_acc`), so the
    comparison is made against what the champion scored, not what it is believed to score.
    Ties keep the current champion. A champion without that tag (e.g. registered under
    another metric) is never displaced automatically; move the alias by hand then.

    Args:
        mode: "max" when a higher value is better (accuracy, AUC), "min" for a loss.
        tags: more version tags (values are stringified; None values are left out).
    """
    configure()
    value = float(metric_value)
    version = mlflow.register_model(
        model_uri, registered_name,
        tags={**{k: str(v) for k, v in (tags or {}).items() if v is not None},
              metric_name: repr(value),
              "higher_is_better": str(mode == "max").lower()})
    new_version = int(version.version)
    client = MlflowClient()
    current = _champion_metric(client, registered_name, metric_name)

    if not math.isfinite(value):
        _log.warning("%s=%s is not finite: not a champion", metric_name, value)
        moved = False
    elif current is None:
        moved = True
    elif math.isnan(current[1]):
        _log.warning("champion version %d of %s has no numeric %s tag: alias left where it is",
                     current[0], registered_name, metric_name)
        moved = False
    else:
        moved = is_better(value, current[1], mode)

    if moved:
        client.set_registered_model_alias(registered_name, CHAMPION_ALIAS, str(new_version))
    return RegistrationResult(new_version, new_version if moved else (current and current[0]),
                              moved, current)


def describe_version(registered_name: str, version: int, description: str) -> None:
    """The version's description: what the MLflow UI shows a person choosing a model."""
    configure()
    MlflowClient().update_model_version(registered_name, str(version), description=description)


def alias_note(result: RegistrationResult, metric: str, value: float) -> str:
    """Why `@champion` moved to this version, or stayed where it was, in one sentence."""
    if result.previous is None:
        return f"first version with a {metric}: it became the champion"
    old_version, old = result.previous
    if result.moved:
        return (f"it became the champion: {metric} {value:.4f} beats version {old_version}'s "
                f"{old:.4f}")
    if not math.isfinite(value):
        return f"not the champion: its {metric} is {value}"
    if math.isnan(old):
        return (f"the champion stays version {old_version}, which has no {metric} tag to "
                f"compare with (move the alias by hand to choose)")
    return (f"the champion stays version {old_version}: its {metric} {old:.4f} is not beaten "
            f"by {value:.4f}")


def version_description(registered_name: str, version: int, *, facts: Mapping[str, Any],
                        val: Mapping[str, float], test: Mapping[str, float],
                        alias: str) -> str:
    """Markdown for a version: what it is, how it scored, the alias, how to use it.

    Args:
        facts: ordered `label -> value` lines (dataset, backbone, weights, freeze depth,
            learning rate, epochs, run ...).
        val, test: metric name (acc, auc, loss) -> value, for the best epoch and the test.
    """
    uri = f"models:/{registered_name}/{version}"
    rows = [f"| {name} | {_num(val.get(name))} | {_num(test.get(name))} |"
            for name in ("acc", "auc", "loss")]
    lines = [f"**{facts.get('summary', registered_name)}**", "",
             "| metric | validation (best epoch) | test |", "|---|---|---|", *rows, "",
             f"**Champion:** {alias}.", ""]
    lines += [f"- **{label}:** {value}" for label, value in facts.items() if label != "summary"]
    lines += ["", "**Use it.** Raw images in (uint8 pixels `[N, H, W(, C)]` of any size, or "
                  "PNG/JPEG bytes in a column `image`), a DataFrame of `label` and "
                  "`prob_<class>` out:", "",
              f"    mlflow.pyfunc.load_model(\"{uri}\").predict(images)",
              f"    mlflow models serve -m \"{uri}\" --env-manager local -p 5001",
              "", "The bare network (normalised float32 NCHW in, logits out): "
                  f"`mlflow.pytorch.load_model(\"{uri}\", device=\"cpu\")`; as the starting "
                  f"weights of a new run: `--model.weights={uri}`."]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"
