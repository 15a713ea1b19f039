"""`data.augment=auto`: an augmentation preset chosen from the data itself, and why.

What suits small grey glyphs (a little rotation, shift and zoom; never a mirror: a mirrored
2 is no 2) does not suit photographs (random crops, mirrored left-right) or objects on a
plain background such as cells under a microscope (no up, down, left or right: the eight
flips and quarter turns). The choice looks at a sample of the training images:

- grey and at most `GLYPH_SIDE` px on a side: `digits`;
- a plain background (the pixels of each image's outer ring barely vary, `PLAIN_RING`):
  `microscopy`;
- anything else: `natural`.
"""

from __future__ import annotations

import numpy as np

from tlray.data.dataset import DatasetInfo, read_shard, decode_images

GLYPH_SIDE = 64  # MNIST-like glyph sets are 28-32 px
# Median (over the sampled images) of the spread of an image's outer-ring pixels, as a
# fraction of the 0-255 range, under which a background is plain: a cell on black or a
# digit on black sits near 0.01-0.05, a photograph's edges near 0.15-0.3.
PLAIN_RING = 0.08
RING = 0.1  # the outer ring's width, as a fraction of the side
SAMPLE = 256  # images looked at


def choose_augmentation(info: DatasetInfo) -> tuple[str, str]:
    """(preset, why), from the dataset's first training shards."""
    side = max(info.height, info.width)
    if info.channels == 1 and side <= GLYPH_SIDE:
        return "digits", (f"small grey images ({info.height}x{info.width}) look like glyphs: "
                          f"a little rotation, shift and zoom, never mirrored")
    spread = ring_spread(_sample(info))
    if spread < PLAIN_RING:
        return "microscopy", (f"objects on a plain background (edge pixels vary by "
                              f"{spread:.0%} of the range): no up or left, so the 8 flips "
                              f"and quarter turns, and a little zoom")
    return "natural", (f"photograph-like images (edge pixels vary by {spread:.0%} of the "
                       f"range): random crops, mirrored left-right")


def ring_spread(images: np.ndarray) -> float:
    """Median over images of the standard deviation of each image's outer-ring pixels,
    as a fraction of 255."""
    n, h, w = images.shape[:3]
    band = max(1, round(RING * min(h, w)))
    mask = np.zeros((h, w), bool)
    mask[:band], mask[-band:], mask[:, :band], mask[:, -band:] = True, True, True, True
    rings = images.astype(np.float32)[:, mask].reshape(n, -1)
    return float(np.median(rings.std(axis=1)) / 255)


def _sample(info: DatasetInfo) -> np.ndarray:
    """Up to `SAMPLE` training images, as stored (uint8 NHWC)."""
    out, rows = [], 0
    for uri in info.shard_uris("train"):
        table = read_shard(uri)
        out.append(decode_images(table.column("image"), info.image_shape))
        rows += table.num_rows
        if rows >= SAMPLE:
            break
    return np.concatenate(out)[:SAMPLE]
