"""Decoded images as uint8 pixel arrays: channel modes and resizing, with numpy and Pillow only.

Kept apart from `tlray.data.preprocess` (which needs torch) so that the processes that decode
and write a dataset's shards (`tlray prepare`, in Ray tasks) start without importing torch.
A logged model ships this module with `preprocess` (see `tlray.serve.log_model`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

MODES = {1: "L", 3: "RGB"}  # channels -> PIL mode of the images a model is trained on


def to_mode(im: Image.Image, mode: str) -> np.ndarray:
    """A decoded image as uint8 pixels in `mode` ("L" or "RGB"), as `tlray prepare` stores
    them: transparent pixels become white in RGB, as image viewers show them."""
    if im.mode in ("RGBA", "LA", "P") and mode == "RGB":
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    return np.asarray(im.convert(mode), dtype=np.uint8)


def resize_pixels(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, C] (or [H, W]) pixels resized to `size` (height, width), bicubic."""
    squeeze = arr.ndim == 3 and arr.shape[-1] == 1
    im = Image.fromarray(arr[..., 0] if squeeze else arr)
    out = np.asarray(im.resize((size[1], size[0]), Image.BICUBIC), dtype=np.uint8)
    return out[..., None] if squeeze or out.ndim == 2 else out
