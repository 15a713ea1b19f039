"""Figures into a run: any matplotlib figure as an artifact (closed once logged), and the
one-image-per-class sample grid every run opens with.

`tlray.track.plots` (matplotlib) is imported only when a figure is logged."""

from __future__ import annotations

from typing import Any

import mlflow


def log_figure(fig: Any, artifact_file: str) -> None:
    """Log a matplotlib figure (e.g. `plots/curves.png`) and close it to free its memory."""
    mlflow.log_figure(fig, artifact_file, save_kwargs={"dpi": 100, "bbox_inches": "tight"})
    from tlray.track.plots import close

    close(fig)


def log_samples(info: Any) -> None:
    """One training image of every class, as `plots/samples.png`: what the run learns from,
    at a glance (both original experiments open with such a grid)."""
    from tlray.data.dataset import sample_per_class
    from tlray.track.plots import sample_grid

    images, labels = sample_per_class(info, "train")
    log_figure(sample_grid(images, labels, info.classes), "plots/samples.png")
