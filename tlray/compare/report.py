"""What a comparison produced, and how it is shown: the rows, the table, the CSV and the chart."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tlray.data.dataset import DatasetInfo
from tlray.track.store import ui_command
from tlray.train.run import TrainResult

COLUMNS = ("model", "backbone", "weights", "head", "freeze", "test_acc", "test_auc",
           "test_loss", "seconds_per_epoch", "trainable_params", "epochs_run", "best_epoch",
           "run_id")

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


def table(rows: Sequence[ModelRow], *, markdown: bool) -> str:
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
             f"{result.epochs} epoch budget each)", "", table(result.rows, markdown=False), ""]
    gains = [f"{label} {_signed(getattr(t, k) - getattr(s, k))}"
             for label, k in (("acc", "test_acc"), ("AUC", "test_auc"))]
    lines.append("transfer - scratch: " + ", ".join(gains))
    lines.append(f"MLflow: experiment {result.experiment!r}, parent run {result.parent_run_id} "
                 f"(comparison.csv, comparison.md, plots/comparison.png)")
    lines.append(f"  transfer run {t.run_id}, scratch run {s.run_id}")
    lines.append(f"  {ui_command()}")
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
