"""Tiny but real logged tlray models whose right answer is known for every generated image.

Their logits are a function of an image's mean brightness (class k = brightness near k*100,
any channel count), so a wrong channel conversion, normalisation or row order shows up as a
wrong label. Shared by the predict tests (tests/test_predict*.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tlray.serve import log_model as logged_model
from tlray.track import registry

CLASSES = ["0", "1", "2"]  # the class names `prepare` gives Kaggle labels 0, 1, 2
SIZE = [12, 12]  # model input size; the generated images are other sizes (8x8, 10x10, ...)


class Brightness(torch.nn.Module):
    """Class k for an image whose mean brightness is nearest k*100 (any channel count)."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        centres = [(k * 100 / 255 - mean) / std for k in range(len(CLASSES))]
        self.register_buffer("centres", torch.tensor(centres))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return -((m[:, None] - self.centres[None, :]) ** 2) * 20.0


def preprocess(channels: int) -> dict:
    return {"mean": [0.5] * channels, "std": [0.5] * channels, "size": SIZE,
            "channels": channels}


def log_champion(name: str, channels: int) -> str:
    """Logs a Brightness model for `channels`-channel input under the active run and makes it
    `name@champion`; returns its model URI."""
    example = bright_images([0, 200], (8, 8, channels))
    uri = logged_model.log_model(Brightness(0.5, 0.5), example, CLASSES, preprocess(channels),
                                 name=name).model_uri
    registry.register_champion(uri, name, "test_acc", 1.0)
    return uri


def bright_images(levels: list[int], shape=(8, 8, 1), seed: int = 0) -> np.ndarray:
    """uint8 images of brightness near each level (+-15 noise)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-15, 16, (len(levels), *shape))
    return np.clip(np.array(levels)[:, None, None, None] + noise, 0, 255).astype(np.uint8)


def png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
