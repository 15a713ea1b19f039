"""Synthetic image folders for the dataset-scale benchmarks: PNG files in class folders, made
with numpy and Pillow (nothing downloads). Each image is a smooth background with a blob and a
little noise, so it compresses and decodes like a photograph of a cell or a digit, not like
random noise (which PNG cannot compress and decodes far slower)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def png_folder(root: Path, images: int, *, side: int, spread: int = 0, mode: str = "RGB",
               classes: int = 2, seed: int = 0) -> Path:
    """`images` PNGs under `root/class_k/`, `side` +- `spread` pixels square; made once (a
    folder already made with the same arguments is reused)."""
    recipe = {"images": images, "side": side, "spread": spread, "mode": mode,
              "classes": classes, "seed": seed}
    stamp = root / ".recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return root
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    for k in range(classes):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:side + spread, 0:side + spread]
    for i in range(images):
        label = i % classes
        s = int(side + rng.integers(-spread, spread + 1)) if spread else side
        base = rng.uniform(120, 230, channels)
        cy, cx, r = rng.uniform(0.3, 0.7) * s, rng.uniform(0.3, 0.7) * s, s * (0.1 + 0.1 * label)
        blob = np.exp(-(((yy[:s, :s] - cy) ** 2 + (xx[:s, :s] - cx) ** 2) / (2 * r * r)))
        pixels = base - blob[..., None] * rng.uniform(60, 110, channels)
        pixels += rng.normal(0, 3, (s, s, channels))
        array = np.clip(pixels, 0, 255).astype(np.uint8)
        Image.fromarray(array[..., 0] if channels == 1 else array, mode).save(
            root / f"class_{label}" / f"img{i:07d}.png")
    stamp.write_text(json.dumps(recipe))
    return root


def subset(root: Path, name: str, images: int) -> Path:
    """A folder of the first `images` images of `root` (hard links: no copies)."""
    out = root.parent / f"{root.name}-{name}"
    if (out / ".done").is_file():
        return out
    files = sorted(root.glob("class_*/*.png"), key=lambda p: p.name)[:images]
    for f in files:
        target = out / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.hardlink_to(f)
    (out / ".done").write_text("")
    return out
