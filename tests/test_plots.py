"""tlray.track.plots: structure of each figure, and PNGs that really are PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from tlray.errors import TlrayError
from tlray.track import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = [str(d) for d in range(10)]


def _digits(n_per_class: int = 3, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), n_per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 256, (len(labels), 28, 28, channels), dtype=np.uint8)
    return images, labels


def _image_count(fig: Figure) -> int:
    return sum(len(ax.images) for ax in fig.axes)


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 2_000  # a real picture, not an empty canvas


@pytest.mark.parametrize("channels", [1, 3])
def test_sample_grid_one_per_class_titled_with_class_name(tmp_path: Path, channels: int) -> None:
    images, labels = _digits(channels=channels)
    fig = plots.sample_grid(images, labels, CLASSES)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 10 and _image_count(fig) == 10
    assert [ax.get_title() for ax in fig.axes] == CLASSES
    first = fig.axes[3].images[0].get_array()
    np.testing.assert_array_equal(first, images[np.flatnonzero(labels == 3)[0]].squeeze())
    _assert_png(plots.save_png(fig, tmp_path / "nested" / "samples.png"))


def test_sample_grid_several_per_class_skips_missing_classes() -> None:
    images, labels = _digits(n_per_class=3)
    keep = labels < 4  # classes 4..9 have no images
    fig = plots.sample_grid(images[keep], labels[keep], CLASSES, per_class=2)
    assert _image_count(fig) == 8
    assert [ax.get_title() for ax in fig.axes] == ["0", "0", "1", "1", "2", "2", "3", "3"]


def test_sample_grid_rejects_float_images() -> None:
    with pytest.raises(TlrayError, match="uint8"):
        plots.sample_grid(np.zeros((2, 8, 8, 3), np.float32), np.array([0, 1]), CLASSES)


def test_learning_curves_loss_and_accuracy_panels() -> None:
    history = [
        dict(epoch=e, train_loss=1 / e, val_loss=1.2 / e, train_acc=0.8, val_acc=0.7, val_auc=0.9)
        for e in range(1, 6)
    ]
    history[2]["val_auc"] = float("nan")  # a gap, not a crash
    fig = plots.learning_curves(history)
    loss_ax, acc_ax = fig.axes
    assert loss_ax.get_title() == "loss" and "accuracy" in acc_ax.get_title()
    assert [line.get_label() for line in loss_ax.lines] == ["train_loss", "val_loss"]
    assert [line.get_label() for line in acc_ax.lines] == ["train_acc", "val_acc", "val_auc"]
    np.testing.assert_array_equal(loss_ax.lines[0].get_xdata(), [1, 2, 3, 4, 5])


def test_learning_curves_loss_only() -> None:
    fig = plots.learning_curves([{"train_loss": 1.0}, {"train_loss": 0.5}])
    assert len(fig.axes) == 1
    with pytest.raises(TlrayError, match="history"):
        plots.learning_curves([])


def test_confusion_matrix_annotates_every_count(tmp_path: Path) -> None:
    cm = np.array([[50, 2, 0], [3, 40, 1], [0, 5, 60]])
    fig = plots.confusion_matrix_plot(cm, ["cat", "dog", "fish"])
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts == [str(v) for v in cm.ravel()]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "fish"]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true"
    _assert_png(plots.save_png(fig, tmp_path / "cm.png"))
    with pytest.raises(TlrayError, match=r"\(2, 2\)"):
        plots.confusion_matrix_plot(cm, ["a", "b"])


def test_predictions_grid_marks_mistakes_in_red_first() -> None:
    images, labels = _digits(n_per_class=5, channels=3)  # 50 images
    preds = labels.copy()
    wrong = [4, 17, 30]
    preds[wrong] = (labels[wrong] + 1) % 10
    fig = plots.predictions_grid(images, labels, preds, CLASSES, max_images=36)
    assert _image_count(fig) == 36
    red = [ax for ax in fig.axes if ax.title.get_color() == "red"]
    assert len(red) == 3
    assert red == fig.axes[:3]  # mistakes come first
    assert red[0].get_title() == f"pred {preds[4]} / true {labels[4]}"
    assert all(to_rgba(ax.title.get_color()) != to_rgba("red") for ax in fig.axes[3:])
    assert "3 wrong of 50" in fig.get_suptitle()


def test_predictions_grid_small_batch() -> None:
    images, labels = _digits(n_per_class=1)
    fig = plots.predictions_grid(images[:4], labels[:4], labels[:4], CLASSES)
    assert _image_count(fig) == 4 and len(fig.axes) == 4
    with pytest.raises(TlrayError, match="same number"):
        plots.predictions_grid(images[:4], labels[:3], labels[:4], CLASSES)


def test_sweep_plot_one_line_per_freeze_depth_on_log_lr(tmp_path: Path) -> None:
    results = [
        {"lr": lr, "freeze_depth": depth, "val_acc": 0.9 - depth * 0.01 + lr}
        for depth in (2, 0)
        for lr in (1e-2, 1e-4, 1e-3)
    ]
    results += [
        {"lr": 1e-3, "freeze_depth": "all", "val_acc": 0.8},
        {"lr": 1e-2, "freeze_depth": "all", "val_acc": float("nan")},  # a failed trial
    ]
    fig = plots.sweep_plot(results, "val_acc")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert [line.get_label() for line in ax.lines] == ["freeze 0", "freeze 2", "freeze all"]
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [1e-4, 1e-3, 1e-2])
    assert len(ax.lines[2].get_xdata()) == 1
    assert ax.get_ylabel() == "val_acc"
    _assert_png(plots.save_png(fig, tmp_path / "sweep.png"))
    with pytest.raises(TlrayError, match="val_auc"):
        plots.sweep_plot(results, "val_auc")
