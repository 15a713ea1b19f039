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

import argparse
import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tlray import config as config_mod
from tlray import tracking, trainer
from tlray.config import Config
from tlray.datasets import DatasetInfo
from tlray.errors import TlrayError
from tlray.models import SCRATCH_CNN
from tlray.trainer import TrainResult

ROLES = ("transfer", "scratch")
# The scratch side's fixed settings: the malaria original's CNN, trained from nothing.
SCRATCH_SETTINGS = (f"model.backbone={SCRATCH_CNN}", "model.weights=none", "model.freeze=0",
                    "model.head=linear")
# What scratch_overrides may change. Data, epochs, seed, scaling stay shared.
SCRATCH_OVERRIDABLE = ("optim", "model.head", "model.freeze", "model.drop_rate")
COLUMNS = ("model", "backbone", "weights", "head", "freeze", "test_acc", "test_auc",
           "test_loss", "seconds_per_epoch", "trainable_params", "epochs_run", "best_epoch",
           "run_id")
# Logged on the parent run as "<role>_<name>".
PARENT_METRICS = ("test_acc", "test_auc", "test_loss", "seconds_per_epoch", "trainable_params",
                  "epochs_run")
SMOKE_OVERRIDES = ("--train.epochs=1", "--data.image_size=32", "--scaling.num_workers=2",
                   "--scaling.cpus_per_worker=0.5")


@dataclass(frozen=True)
class ModelRow:
    """One side of the comparison: one row of `comparison.csv`."""

    model: str  # "transfer" | "scratch"
    backbone: str
    weights: str
    head: str
    freeze: str
    test_acc: float
    test_auc: float
    test_loss: float
    seconds_per_epoch: float  # mean of the epochs' wall time (train + validation)
    trainable_params: int
    epochs_run: int
    best_epoch: int
    run_id: str

    def as_dict(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in COLUMNS}


@dataclass
class ComparisonResult:
    """Both runs, side by side, and where they are in MLflow."""

    transfer: ModelRow
    scratch: ModelRow
    parent_run_id: str
    experiment: str
    dataset: DatasetInfo
    epochs: int  # the shared budget (early stopping may have used fewer)
    runs: dict[str, TrainResult]  # by role

    @property
    def rows(self) -> list[ModelRow]:
        return [self.transfer, self.scratch]


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

    # Resolve (prepare) the dataset once, and pin both runs to the same prepared splits.
    info = trainer.resolve_dataset(cfg.data.dataset, progress=progress)
    trainer.require_splits(info)
    configs = {"transfer": _on_dataset(cfg, info.uri),
               "scratch": _on_dataset(scratch_cfg, info.uri)}
    model_infos = {role: trainer.check_model(c, info)[1] for role, c in configs.items()}
    trainer.connect(cfg)

    import mlflow

    experiment = trainer.experiment_name(cfg, info)
    tags = {"kind": "compare", "dataset": info.name, "dataset_hash": info.fingerprint,
            "transfer_backbone": cfg.model.backbone, "scratch_backbone": SCRATCH_CNN}
    commit = tracking.git_commit()
    if commit:
        tags["git_commit"] = commit
    with tracking.start_run(experiment, run_name=cfg.tracking.run_name or "compare",
                            tags=tags) as parent:
        parent_id = parent.info.run_id
        mlflow.log_params({"transfer.backbone": cfg.model.backbone,
                           "transfer.weights": cfg.model.weights,
                           "scratch.backbone": SCRATCH_CNN,
                           "scratch_overrides": " ".join(scratch_overrides or []) or "none",
                           "data.dataset": info.uri, "data.image_size": cfg.data.image_size,
                           "data.batch_size": cfg.data.batch_size,
                           "train.epochs": cfg.train.epochs, "train.seed": cfg.train.seed})
        for role, c in configs.items():
            mlflow.log_dict(c.to_dict(), f"configs/{role}.yaml")

        runs: dict[str, TrainResult] = {}
        for i, (role, c) in enumerate(configs.items(), 1):
            if progress:
                print(f"compare [{i}/2] {role}: {c.model.backbone} (weights {c.model.weights}, "
                      f"freeze {c.model.freeze}, head {c.model.head}), "
                      f"{c.train.epochs} epoch(s)", flush=True)
            runs[role] = trainer.train(c, parent_run_id=parent_id,
                                       extra_tags={"compare_role": role},
                                       run_name=f"{role}-{c.model.backbone}")
        rows = {role: _row(role, configs[role], runs[role], model_infos[role].trainable_params)
                for role in ROLES}
        result = ComparisonResult(transfer=rows["transfer"], scratch=rows["scratch"],
                                  parent_run_id=parent_id, experiment=experiment, dataset=info,
                                  epochs=cfg.train.epochs, runs=runs)
        _log_comparison(result)
    return result


def _on_dataset(cfg: Config, uri: str) -> Config:
    """A copy of `cfg` that reads exactly this prepared dataset."""
    pinned = config_mod.from_plain(cfg.to_dict())
    pinned.data.dataset = uri
    return pinned


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
    mlflow.log_text(_table(result.rows, markdown=True) + "\n", "comparison.md")
    tracking.log_figure(comparison_plot(result.rows), "plots/comparison.png")


# --------------------------------------------------------------------------- table and chart


def comparison_csv(rows: Sequence[ModelRow]) -> str:
    """`COLUMNS` as CSV; floats in full precision (they equal the runs' MLflow metrics)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v)
                         for k, v in row.as_dict().items()})
    return out.getvalue()


_DISPLAY = (  # header, attribute, format
    ("model", "model", "{}"), ("backbone", "backbone", "{}"), ("weights", "weights", "{}"),
    ("test acc", "test_acc", "{:.4f}"), ("test AUC", "test_auc", "{:.4f}"),
    ("test loss", "test_loss", "{:.4f}"), ("s/epoch", "seconds_per_epoch", "{:.1f}"),
    ("trained params", "trainable_params", "{:,}"), ("epochs", "epochs_run", "{}"),
)


def _cell(value: Any, fmt: str) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return fmt.format(value)


def _table(rows: Sequence[ModelRow], *, markdown: bool) -> str:
    header = [h for h, _, _ in _DISPLAY]
    body = [[_cell(getattr(r, attr), fmt) for _, attr, fmt in _DISPLAY] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    text_cols = {i for i, (_, attr, _) in enumerate(_DISPLAY)
                 if attr in ("model", "backbone", "weights")}

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i in text_cols else c.rjust(w)
                  for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |" if markdown else "  ".join(padded)

    lines = [line(header)]
    if markdown:
        lines.append("|" + "|".join(("-" * (w + 1) + ":") if i not in text_cols
                                    else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|")
    lines += [line(cells) for cells in body]
    return "\n".join(lines)


def format_comparison(result: ComparisonResult) -> str:
    """The side-by-side table a person reads at the end, and where the MLflow runs are."""
    t, s = result.transfer, result.scratch
    test_rows = result.dataset.splits["test"].rows
    lines = [f"transfer vs scratch on {result.dataset.name} ({test_rows} test images, "
             f"{result.epochs} epoch budget each)", "", _table(result.rows, markdown=False), ""]
    gains = [f"{label} {_signed(getattr(t, k) - getattr(s, k))}"
             for label, k in (("acc", "test_acc"), ("AUC", "test_auc"))]
    lines.append("transfer - scratch: " + ", ".join(gains))
    lines.append(f"MLflow: experiment {result.experiment!r}, parent run {result.parent_run_id} "
                 f"(comparison.csv, comparison.md, plots/comparison.png)")
    lines.append(f"  transfer run {t.run_id}, scratch run {s.run_id}")
    lines.append(f"  {tracking.ui_command()}")
    return "\n".join(lines)


def _signed(value: float) -> str:
    return f"{value:+.4f}" if math.isfinite(value) else "n/a"


def comparison_plot(rows: Sequence[ModelRow]) -> Figure:
    """Test accuracy and AUC, one bar per model side by side, each bar labelled."""
    metrics = (("test accuracy", "test_acc"), ("test AUC", "test_auc"))
    fig = Figure(figsize=(5.0, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(metrics))
    for i, row in enumerate(rows):
        values = [getattr(row, attr) for _, attr in metrics]
        shown = [v if math.isfinite(v) else 0.0 for v in values]
        bars = ax.bar(x + (i - (len(rows) - 1) / 2) * width, shown, width,
                      label=f"{row.model} ({row.backbone})")
        ax.bar_label(bars, labels=[_cell(v, "{:.3f}") for v in values], fontsize=8, padding=2)
    ax.set_xticks(x, labels=[label for label, _ in metrics])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("test split")
    ax.set_title("transfer vs scratch")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(rows),
              frameon=False)
    return fig


# --------------------------------------------------------------------------- command line


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `tlray compare` / jobs/compare_scratch.py; sets `run=run_compare`.

    Bare `--section.key=value` overrides are collected by `tlray.cli.main`, which merges
    them into `args.overrides` (or pass them with `--set section.key=value`).
    """
    parser.add_argument("--data", help="prepared dataset directory/URI or a source to prepare "
                                       "(default: the config's data.dataset, builtin:mnist)")
    parser.add_argument("--config", help="YAML config for the transfer model (and everything "
                                         "both models share)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="a config override for both models (repeatable); bare "
                             "--section.key=value works too")
    parser.add_argument("--scratch", dest="scratch_overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="an override for the scratch model only: optim.* or "
                             "model.head/freeze/drop_rate (repeatable), e.g. optim.lr=3e-4")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny budget: 1 epoch, 32 px, 2 workers x 0.5 CPU (the transfer "
                             "backbone stays as configured)")
    parser.set_defaults(run=run_compare)


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults, then --config, then --smoke, then --data, then the overrides."""
    overrides = list(SMOKE_OVERRIDES) if args.smoke else []
    if args.data:
        overrides.append(f"--data.dataset={args.data}")
    overrides += args.overrides
    return config_mod.load(args.config, overrides)


def run_compare(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = compare(cfg, scratch_overrides=list(args.scratch_overrides or []))
    print(format_comparison(result))
    return 0
