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
from tlray.track.metrics import format_number, is_better

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


@dataclasses.dataclass(frozen=True)
class Winner:
    """A sweep's pick, as its version's description states it: how its trial trained, how it
    scored and what it was chosen from."""

    run_id: str
    run_name: str
    backbone: str
    weights: str
    freeze: str  # as the user wrote it: a depth or a schedule such as all:2,0@0.5
    lr: float
    optimizer: str
    schedule: str
    epochs: int  # planned
    batch_size: int
    image_size: int
    trainable_params: int
    total_params: int
    ema: float | None  # the weight average's decay; None without one
    tta: str
    val: Mapping[str, float | None]  # acc, auc, loss of the best epoch
    test: Mapping[str, float | None]
    epochs_run: Any
    best_epoch: Any
    monitor: str  # what the best epoch and the pick were chosen by
    trials: int  # how many sweep trials it was chosen from
    run_metrics: Mapping[str, float]  # its MLflow run's (test-time augmentation's cost)


def describe_winner(registered_name: str, result: RegistrationResult, winner: Winner, info: Any,
                    metric: str, value: float) -> None:
    """The description of the version `register_champion` made of a sweep's pick.

    Args:
        info: the `tlray.data.dataset.DatasetInfo` it trained on.
        metric, value: the champion metric and the pick's value of it.
    """
    describe_version(registered_name, result.version, version_description(
        registered_name, result.version, facts=winner_facts(winner, info), val=winner.val,
        test=winner.test, alias=alias_note(result, metric, value)))


def winner_facts(w: Winner, info: Any) -> dict[str, str]:
    """The description's lines about a sweep's pick: a summary, the dataset, the backbone,
    the training, how it was chosen, and what test-time augmentation cost and bought."""
    test_acc = format_number(w.test["acc"])
    splits = ", ".join(f"{info.splits[s].rows:,} {s}" for s in ("train", "val", "test"))
    facts = {
        "summary": f"{w.backbone} ({w.weights} weights), freeze {w.freeze}, lr {w.lr:.3g}, on "
                   f"{info.name}: test accuracy {test_acc}",
        "Dataset": f"`{info.name}` (hash `{info.fingerprint[:12]}`), {splits} images of "
                   f"{info.height}x{info.width} {info.mode}, {info.num_classes} classes; "
                   f"from {info.source.get('uri', '?')}",
        "Backbone": f"{w.backbone}, weights `{w.weights}`, freeze depth {w.freeze} "
                    f"({w.trainable_params:,} of {w.total_params:,} parameters trained)",
        "Training": f"lr {w.lr:.3g} ({w.optimizer}, {w.schedule} schedule), "
                    f"{format_number(w.epochs_run)} of {w.epochs} epochs, best epoch "
                    f"{format_number(w.best_epoch)} by {w.monitor}, batch {w.batch_size}, "
                    f"input {w.image_size} px",
        "Chosen": f"best of {w.trials} sweep trials by {w.monitor}; MLflow run `{w.run_id}` "
                  f"({w.run_name})",
    }
    if w.ema is not None:
        facts["Training"] += f"; weights averaged (EMA, decay {w.ema})"
    m = w.run_metrics
    if w.tta != "none" and "test_ms_per_image_without_tta" in m:
        facts["Test-time augmentation"] = (
            f"`{w.tta}` (the served model applies it too): test accuracy {test_acc}, "
            f"{format_number(m.get('test_acc_without_tta'))} without it; "
            f"{m['test_ms_per_image']:.2f} ms per image, "
            f"{m['test_ms_per_image_without_tta']:.2f} without")
    return facts


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
