"""The pictures a person looks at instead of reading numbers: samples, curves, errors, sweeps.

Figures are built as `matplotlib.figure.Figure` objects on the Agg canvas, not through
pyplot, so no display is needed, the process-wide backend is left alone and nothing
accumulates in pyplot's figure registry. Each function returns its figure; log it with
`tlray.track.figures.log_figure` or write it with `save_png`, both of which close it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tlray.errors import TlrayError

WRONG_COLOR = "red"
RIGHT_COLOR = "green"
_CELL_INCHES = 1.6  # one image tile; keeps titles readable without huge files


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def close(fig: Figure) -> None:
    """Release a figure; only figures made through pyplot are registered anywhere."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG (creating parent folders) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    close(fig)
    return path


def _check_images(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC (C = 1 or 3) or NHW, as NHW / NHWC ready for imshow."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise TlrayError(
            f"images have shape {images.shape} and dtype {images.dtype}: expected uint8 NHWC "
            "(C = 1 or 3) or NHW"
        )
    if images.ndim == 4:
        if images.shape[-1] not in (1, 3):
            raise TlrayError(f"images have {images.shape[-1]} channels: expected 1 or 3 (NHWC)")
        if images.shape[-1] == 1:
            images = images[..., 0]
    return images


def _show(ax: Any, image: np.ndarray) -> None:
    if image.ndim == 2:
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image)
    ax.set_axis_off()


def _grid(n: int, ncols: int) -> tuple[Figure, list[Any]]:
    """A figure with exactly `n` image axes laid out `ncols` wide (spare cells removed)."""
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = _figure(_CELL_INCHES * ncols, _CELL_INCHES * nrows + 0.3)
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel())
    for ax in axes[n:]:
        ax.remove()
    return fig, axes[:n]


def _name(class_names: Sequence[str], index: int) -> str:
    return class_names[index] if 0 <= index < len(class_names) else str(index)


def sample_grid(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    per_class: int = 1,
) -> Figure:
    """The first `per_class` images of every class, titled with the class name.

    One per class is laid out in rows of five (as the MNIST notebook did); more per class
    gives one row per class. Classes without images are left out.
    """
    images = _check_images(images)
    labels = np.asarray(labels).astype(int)
    if per_class < 1:
        raise TlrayError(f"per_class is {per_class}: expected at least 1")
    picks = [
        (cls, idx)
        for cls in range(len(class_names))
        for idx in np.flatnonzero(labels == cls)[:per_class]
    ]
    if not picks:
        raise TlrayError("sample_grid: no image has a label among the given class names")
    fig, axes = _grid(len(picks), 5 if per_class == 1 else per_class)
    for ax, (cls, idx) in zip(axes, picks):
        _show(ax, images[idx])
        ax.set_title(class_names[cls], fontsize=9)
    return fig


def augmentation_grid(rows: np.ndarray, row_titles: Sequence[str], what: str) -> Figure:
    """One row per image: the image as the model sees it, then augmented draws of it.

    Args:
        rows: uint8 [R, K, H, W, C] (see `tlray.data.augment.preview`).
        row_titles: one per row (e.g. the class name).
        what: the augmentation, for the figure's title.
    """
    n_rows, n_cols = rows.shape[:2]
    fig, axes = _grid(n_rows * n_cols, n_cols)
    for r in range(n_rows):
        images = _check_images(rows[r])
        for c in range(n_cols):
            ax = axes[r * n_cols + c]
            _show(ax, images[c])
            if c == 0:
                ax.set_title(f"{row_titles[r]} (as is)", fontsize=8)
    fig.suptitle(f"augmentation: {what}", fontsize=10)
    return fig


def learning_curves(history: Sequence[Mapping[str, Any]],
                    phase_starts: Sequence[int] = ()) -> Figure:
    """Loss per epoch, and accuracy/AUC per epoch when present, train vs validation.

    Columns are found by name: `*loss` go to the first panel, `*acc`, `*accuracy` and `*auc`
    to the second. Missing or non-finite values leave a gap. `phase_starts`: the first epoch
    of each later phase of a freeze schedule, marked by a dashed line.
    """
    if not history:
        raise TlrayError("learning_curves: history is empty: expected one dict per epoch")
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    keys = list(dict.fromkeys(k for row in history for k in row if k != "epoch"))
    losses = [k for k in keys if k.endswith("loss")]
    scores = [k for k in keys if k.endswith(("acc", "accuracy", "auc"))]
    panels = [(t, cols) for t, cols in (("loss", losses), ("accuracy / AUC", scores)) if cols]
    if not panels:
        raise TlrayError(
            f"learning_curves: no loss/acc/auc columns among {keys}: expected keys like "
            "train_loss, val_loss, train_acc, val_acc"
        )
    fig = _figure(4.2 * len(panels), 3.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, cols) in zip(axes, panels):
        for col in cols:
            values = [_number(row.get(col)) for row in history]
            ax.plot(epochs, values, marker="o", markersize=3, label=col)
        for n, start in enumerate(phase_starts, 2):
            ax.axvline(start - 0.5, color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"phase {n}", (start - 0.5, 1), xycoords=("data", "axes fraction"),
                        xytext=(2, -10), textcoords="offset points", fontsize=7, color="grey")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def confusion_matrix_plot(cm: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Counts of true (rows) vs predicted (columns) classes, each cell annotated."""
    cm = np.asarray(cm)
    n = len(class_names)
    if cm.shape != (n, n):
        raise TlrayError(
            f"confusion matrix has shape {cm.shape}: expected ({n}, {n}) for {n} classes"
        )
    side = min(12.0, 2.0 + 0.5 * n)
    fig = _figure(side + 1.0, side)
    ax = fig.subplots()
    image = ax.imshow(cm, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    crowded = n > 5 and max(len(str(c)) for c in class_names) > 2
    ax.set_xticks(
        range(n),
        labels=list(class_names),
        rotation=45 if crowded else 0,
        ha="right" if crowded else "center",
    )
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    threshold = cm.max() / 2 if cm.size else 0
    fontsize = max(5, 10 - n // 5)
    for i in range(n):
        for j in range(n):
            count = cm[i, j]
            text = f"{count:g}" if np.issubdtype(cm.dtype, np.floating) else str(int(count))
            color = "white" if count > threshold else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=color)
    return fig


def predictions_grid(
    images: np.ndarray,
    labels: np.ndarray,
    preds: np.ndarray,
    class_names: Sequence[str],
    max_images: int = 36,
) -> Figure:
    """Predicted vs true label per image, mistakes first, each mistake titled in red.

    Mistakes come first because they are what a person opens this picture for.
    """
    images = _check_images(images)
    labels = np.asarray(labels).astype(int)
    preds = np.asarray(preds).astype(int)
    if not len(images) == len(labels) == len(preds):
        raise TlrayError(
            f"predictions_grid: {len(images)} images, {len(labels)} labels and {len(preds)} "
            "predictions: expected the same number of each"
        )
    wrong = labels != preds
    order = np.concatenate([np.flatnonzero(wrong), np.flatnonzero(~wrong)])[:max_images]
    if len(order) == 0:
        raise TlrayError("predictions_grid: no images to show")
    fig, axes = _grid(len(order), 6)
    for ax, idx in zip(axes, order):
        _show(ax, images[idx])
        pred, true = _name(class_names, preds[idx]), _name(class_names, labels[idx])
        if wrong[idx]:
            ax.set_title(f"pred {pred} / true {true}", color=WRONG_COLOR, fontsize=8)
        else:
            ax.set_title(pred, color=RIGHT_COLOR, fontsize=8)
    fig.suptitle(f"{int(wrong.sum())} wrong of {len(labels)} (mistakes first, in red)", fontsize=10)
    return fig


def _depth_order(depth: Any) -> tuple[int, Any]:
    """Numeric freeze depths in order, then names such as "all"."""
    if isinstance(depth, (int, float)) and not isinstance(depth, bool):
        return (0, depth)
    return (1, str(depth))


def sweep_plot(
    results: Sequence[Mapping[str, Any]],
    metric: str,
    lr_key: str = "lr",
    depth_key: str = "freeze_depth",
) -> Figure:
    """Validation metric against learning rate (log scale), one line per freeze depth.

    Rows without a finite metric (e.g. failed trials) are left out.
    """
    by_depth: dict[Any, list[tuple[float, float]]] = {}
    for row in results:
        value, lr = _number(row.get(metric)), _number(row.get(lr_key))
        if math.isfinite(value) and math.isfinite(lr) and lr > 0:
            by_depth.setdefault(row.get(depth_key), []).append((lr, value))
    if not by_depth:
        raise TlrayError(f"sweep_plot: no result has a finite {metric!r} and a positive {lr_key!r}")
    fig = _figure(5.0, 3.5)
    ax = fig.subplots()
    for depth in sorted(by_depth, key=_depth_order):
        points = sorted(by_depth[depth])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"freeze {depth}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(metric)
    ax.set_title(f"sweep: {metric} by learning rate and freeze depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def lr_find_plot(curves: Sequence[Any]) -> Figure:
    """The learning-rate range test: the smoothed loss against the learning rate (log
    scale), one line per freeze depth, each depth's suggestion marked. Read it from the left:
    the loss falls as the rate grows, then turns up; the suggestion sits where it still falls
    steadily, well before the turn."""
    fig = _figure(5.5, 3.6)
    ax = fig.subplots()
    for curve in curves:
        line, = ax.plot(curve.lrs, curve.losses, label=f"freeze {curve.freeze}: "
                                                      f"{curve.suggestion:.2g}")
        ax.plot(curve.lrs, curve.raw, color=line.get_color(), alpha=0.2, linewidth=0.8)
        for lr, marker in ((curve.suggestion, "o"), (curve.steepest, "x")):
            at = min(range(len(curve.lrs)), key=lambda i: abs(curve.lrs[i] - lr))
            ax.plot(curve.lrs[at], curve.losses[at], marker=marker, color=line.get_color(),
                    markersize=8, markeredgewidth=2)
    finite = [v for c in curves for v in c.losses if math.isfinite(v)]
    starts = [c.losses[0] for c in curves if c.losses and math.isfinite(c.losses[0])]
    if finite and starts:  # every curve from its start; a loss that runs away is cut off
        ax.set_ylim(min(finite) * 0.9, max(starts) * 1.1)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title("learning-rate range test: suggestion o, fastest fall x")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
