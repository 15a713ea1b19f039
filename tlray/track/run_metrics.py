"""Metrics into a run: one epoch's values (a non-finite one skipped, not fatal), and the best
epoch's values attached to the model logged from it."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

_log = logging.getLogger(__name__)


def log_epoch_metrics(metrics: Mapping[str, Any], epoch: int) -> dict[str, float]:
    """Log one epoch's metrics at step=epoch, skipping NaN/inf values with a warning.

    A diverged loss should show up as a gap in the curves and a warning, not crash the run
    that would have reported it.

    Returns:
        The metrics that were logged.
    """
    finite: dict[str, float] = {}
    for key, value in metrics.items():
        number = float(value)
        if math.isfinite(number):
            finite[key] = number
        else:
            _log.warning("metric %s=%s at epoch %d is not finite: not logged", key, value, epoch)
    if finite:
        mlflow.log_metrics(finite, step=int(epoch))
    return finite


def link_metrics(run_id: str, model_id: str, keys: list[str], step: int,
                 dataset: Any = None) -> None:
    """Attaches the run's `keys` at `step` (e.g. the best epoch's) to a logged model, which is
    how the MLflow UI's Models tab lists and sorts them, and to the MLflow `dataset` they were
    measured on, if given. The values keep their timestamps, so the run's own history gains
    no second entry."""
    from mlflow.entities import Metric

    client = MlflowClient()
    on = {"dataset_name": dataset.name, "dataset_digest": dataset.digest} if dataset else {}
    linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, **on)
              for key in keys for m in client.get_metric_history(run_id, key)
              if m.step == step]
    if linked:
        client.log_batch(run_id, metrics=linked)
