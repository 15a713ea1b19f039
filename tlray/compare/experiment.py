"""Transfer vs scratch: the malaria original's experiment, for any prepared dataset.

`compare(cfg)` trains two models on the same splits with the same budget and puts them side
by side:

  1. the transfer model, exactly as `cfg` says (default: tf_efficientnet_lite0 with the
     packaged ImageNet weights);
  2. the malaria original's small CNN from scratch (`scratch_cnn`, no weights, nothing
     frozen, a linear head), with the SAME dataset, input size, epochs, early stopping,
     batch size, optimizer, schedule, seed and scaling. Only the optimizer and the head may
     be changed for it (`scratch_overrides`, e.g. `optim.lr=3e-4`): everything that decides
     what the two models see stays shared, or the comparison means nothing.

Both are real `trainer.train` runs, nested under one MLflow parent run ("compare") that
gets the table (`comparison.csv`, `comparison.md`), the numbers as metrics
(`transfer_test_acc`, `scratch_test_acc`, ...) and a bar chart (`plots/comparison.png`).
Every check (config, dataset, both models, tracking server, cluster size) runs before the
first run is opened, so bad input never leaves half a comparison behind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tlray import config as config_mod
from tlray.compare.report import (
    ComparisonResult,
    ModelRow,
    comparison_csv,
    comparison_plot,
    table,
)
from tlray.config import Config
from tlray.errors import TlrayError
from tlray.model.scratch import SCRATCH_CNN
from tlray.track.figures import log_figure, log_samples
from tlray.track.params import git_commit
from tlray.track.runs import start_run
from tlray.train.plan import preflight
from tlray.train.run import TrainResult, train

ROLES = ("transfer", "scratch")
# The scratch side's fixed settings: the malaria original's CNN, trained from nothing.
SCRATCH_SETTINGS = (f"model.backbone={SCRATCH_CNN}", "model.weights=none", "model.freeze=0",
                    "model.head=linear")
# What scratch_overrides may change. Data, epochs, seed, scaling stay shared.
SCRATCH_OVERRIDABLE = ("optim", "model.head", "model.freeze", "model.drop_rate")
# Logged on the parent run as "<role>_<name>".
PARENT_METRICS = ("test_acc", "test_auc", "test_loss", "seconds_per_epoch", "trainable_params",
                  "epochs_run")


# --------------------------------------------------------------------------- the experiment


def scratch_config(cfg: Config, scratch_overrides: Sequence[str] | None = None) -> Config:
    """The scratch side of `cfg`: scratch_cnn from no weights, everything else shared.

    Raises:
        TlrayError: for an override outside `SCRATCH_OVERRIDABLE`, or any invalid value.
    """
    overrides = list(scratch_overrides or [])
    for item in overrides:
        key = item.lstrip("-").partition("=")[0]
        if not any(key == k or key.startswith(k + ".") for k in SCRATCH_OVERRIDABLE):
            raise TlrayError(
                f"scratch override {item!r}: only {', '.join(SCRATCH_OVERRIDABLE)} may differ "
                f"for the scratch model; data, epochs, seed and scaling stay shared so that the "
                f"two models are compared like for like (the backbone is always {SCRATCH_CNN})")
    return config_mod.load(None, [*SCRATCH_SETTINGS, *overrides], base=cfg)


def compare(cfg: Config, *, scratch_overrides: list[str] | None = None,
            progress: bool = True) -> ComparisonResult:
    """Trains `cfg`'s transfer model and scratch_cnn on the same splits and budget.

    Args:
        cfg: a validated config for the transfer model (see `tlray.config.load`).
        scratch_overrides: `section.key=value`s for the scratch model only (optimizer and
            head settings, e.g. `optim.lr=3e-4`).
        progress: print one line as each of the two runs starts.

    Returns:
        Both rows and the MLflow parent run. The parent run holds `comparison.csv`,
        `comparison.md`, `plots/comparison.png` and metrics `transfer_*` / `scratch_*`.

    Raises:
        TlrayError: before any run is opened, for a config with nothing to compare (the
            backbone is already scratch_cnn), a bad scratch override, a dataset without
            train/val/test splits, a model that cannot be built, an unreachable tracking
            server or a cluster too small; afterwards, if a training run fails (the parent
            run is then marked FAILED).
    """
    if cfg.model.backbone == SCRATCH_CNN:
        raise TlrayError(f"--model.backbone={SCRATCH_CNN}: nothing to compare; compare trains "
                         f"{SCRATCH_CNN} itself against the configured transfer backbone (e.g. "
                         f"--model.backbone=tf_efficientnet_lite0 --model.weights=packaged)")
    scratch_cfg = scratch_config(cfg, scratch_overrides)
    # Both sides planned before anything is opened, on the same prepared splits.
    transfer = preflight(cfg, progress=progress)
    plans = {"transfer": transfer,
             "scratch": preflight(scratch_cfg, dataset=transfer.dataset, progress=progress)}
    info, experiment = transfer.dataset, transfer.experiment

    import mlflow

    tags = {"kind": "compare", "dataset": info.name, "dataset_hash": info.fingerprint,
            "transfer_backbone": cfg.model.backbone, "scratch_backbone": SCRATCH_CNN}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    with start_run(experiment, run_name=cfg.tracking.run_name or "compare",
                   tags=tags) as parent:
        parent_id = parent.info.run_id
        mlflow.log_params({"transfer.backbone": cfg.model.backbone,
                           "transfer.weights": cfg.model.weights,
                           "scratch.backbone": SCRATCH_CNN,
                           "scratch_overrides": " ".join(scratch_overrides or []) or "none",
                           "data.dataset": info.uri, "data.image_size": cfg.data.image_size,
                           "data.batch_size": cfg.data.batch_size,
                           "train.epochs": cfg.train.epochs, "train.seed": cfg.train.seed})
        for role, plan in plans.items():
            mlflow.log_dict(plan.config.to_dict(), f"configs/{role}.yaml")
        log_samples(info)

        runs: dict[str, TrainResult] = {}
        for i, (role, plan) in enumerate(plans.items(), 1):
            c = plan.config
            if progress:
                print(f"compare [{i}/2] {role}: {c.model.backbone} (weights {c.model.weights}, "
                      f"freeze {c.model.freeze}, head {c.model.head}), "
                      f"{c.train.epochs} epoch(s)", flush=True)
            runs[role] = train(plan, parent_run_id=parent_id,
                               extra_tags={"compare_role": role},
                               run_name=f"{role}-{c.model.backbone}")
        rows = {role: _row(role, plans[role].config, runs[role],
                           plans[role].model.trainable_params) for role in ROLES}
        result = ComparisonResult(transfer=rows["transfer"], scratch=rows["scratch"],
                                  parent_run_id=parent_id, experiment=experiment, dataset=info,
                                  epochs=cfg.train.epochs, runs=runs)
        _log_comparison(result)
    return result


def _row(role: str, cfg: Config, run: TrainResult, trainable_params: int) -> ModelRow:
    seconds = [float(r["epoch_seconds"]) for r in run.history if "epoch_seconds" in r]
    m = run.metrics
    return ModelRow(model=role, backbone=cfg.model.backbone, weights=cfg.model.weights,
                    head=cfg.model.head, freeze=str(cfg.model.freeze),
                    test_acc=float(m["test_acc"]), test_auc=float(m["test_auc"]),
                    test_loss=float(m["test_loss"]),
                    seconds_per_epoch=float(np.mean(seconds)) if seconds else math.nan,
                    trainable_params=int(trainable_params), epochs_run=int(m["epochs_run"]),
                    best_epoch=int(m["best_epoch"]), run_id=str(run.run_id))


def _log_comparison(result: ComparisonResult) -> None:
    """The table, the numbers and the chart, on the (active) parent run."""
    import mlflow

    metrics = {f"{row.model}_{k}": float(getattr(row, k))
               for row in result.rows for k in PARENT_METRICS}
    for k in ("test_acc", "test_auc"):
        metrics[f"transfer_minus_scratch_{k}"] = (getattr(result.transfer, k)
                                                  - getattr(result.scratch, k))
    mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
    mlflow.log_text(comparison_csv(result.rows), "comparison.csv")
    mlflow.log_text(table(result.rows, markdown=True) + "\n", "comparison.md")
    log_figure(comparison_plot(result.rows), "plots/comparison.png")
