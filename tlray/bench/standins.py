"""Stand-ins for the image sets tlray's recipes must carry to, built offline.

The recipes are tuned on the built-in digits; judging one on digits alone tunes it to
digits. With no network there is no malaria set to download, so `cells` draws one like it:
blood cells segmented on black, as the NIH crops are (round pink cells of varied size, shape,
stain and focus, at any orientation), half of them with one to three small dark ring-shaped
parasites, half with none but with the pale artefacts real smears have. `photos` cuts crops
from the two photographs scikit-learn installs (for what a photograph looks like to
`data.augment=auto`, not for accuracy). `jobs/make_cells.py` writes the cells as a folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

CLASSES = ("Parasitized", "Uninfected")


def cell(rng: np.random.Generator, size: int, parasitized: bool) -> np.ndarray:
    """One uint8 RGB image: a cell on black, with parasites or artefacts."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    angle = rng.uniform(0, math.pi)
    a, b = rng.uniform(0.30, 0.44), rng.uniform(0.24, 0.40)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    wobble = 1 + 0.06 * np.sin(rng.integers(3, 7) * np.arctan2(v, u) + rng.uniform(0, 6.3))
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble
    inside = np.clip((1.0 - r) * size / 2.5, 0, 1)  # a soft edge
    stain = np.array([rng.uniform(175, 235), rng.uniform(110, 165), rng.uniform(140, 200)])
    texture = _smooth_noise(rng, size, 4) * rng.uniform(10, 25)
    image = inside[..., None] * (stain + texture[..., None])
    image *= 1 - 0.25 * inside[..., None] * np.clip(1 - r, 0, 1)[..., None]  # paler centre
    count = rng.integers(1, 4) if parasitized else rng.integers(0, 3)
    for _ in range(count):
        image = _spot(rng, image, xx, yy, a, b, angle, size, dark=parasitized)
    image += rng.normal(0, rng.uniform(2, 6), image.shape)
    image = _blur(image, rng.uniform(0.0, 1.2))
    return np.clip(image, 0, 255).astype(np.uint8)


def _spot(rng, image, xx, yy, a, b, angle, size, dark: bool) -> np.ndarray:
    """A parasite (a small dark purple ring) or an artefact (a pale smudge) in the cell."""
    rho, phi = rng.uniform(0, 0.7), rng.uniform(0, 2 * math.pi)
    cx = rho * a * math.cos(phi) * math.cos(angle) - rho * b * math.sin(phi) * math.sin(angle)
    cy = rho * a * math.cos(phi) * math.sin(angle) + rho * b * math.sin(phi) * math.cos(angle)
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) * size
    radius = rng.uniform(1.0, 2.4) * size / 64
    if dark:  # faint and out of focus as often as crisp
        ring = np.exp(-((d - radius) ** 2) / (0.5 * (size / 64) ** 2))
        colour = np.array([rng.uniform(60, 110), rng.uniform(20, 60), rng.uniform(90, 140)])
        weight = rng.uniform(0.25, 0.85) * ring
    elif rng.uniform() < 0.5:  # a pale smudge
        weight = rng.uniform(0.15, 0.35) * np.exp(-(d ** 2) / (2 * radius ** 2))
        colour = np.array([240.0, 215.0, 225.0])
    else:  # a small brownish speck of stain: dark, but a dot, not a ring
        weight = rng.uniform(0.2, 0.5) * np.exp(-(d ** 2) / (0.8 * radius ** 2))
        colour = np.array([rng.uniform(100, 150), rng.uniform(60, 100), rng.uniform(70, 110)])
    inside = (image.sum(axis=-1, keepdims=True) > 0).astype(np.float32)
    return image * (1 - weight[..., None] * inside) + colour * weight[..., None] * inside


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    coarse = rng.normal(0, 1, (cells + 1, cells + 1))
    idx = np.linspace(0, cells, size)
    lo = np.floor(idx).astype(int).clip(0, cells - 1)
    frac = idx - lo
    rows = coarse[lo] * (1 - frac)[:, None] + coarse[lo + 1] * frac[:, None]
    return rows[:, lo] * (1 - frac)[None] + rows[:, lo + 1] * frac[None]


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.3:
        return image
    radius = max(1, int(2 * sigma))
    kernel = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    for axis in (0, 1):
        image = np.apply_along_axis(lambda m: np.convolve(m, kernel, mode="same"), axis, image)
    return image


def cells(n: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` cell images (uint8 [n, size, size, 3]) and labels (0 Parasitized, 1 Uninfected),
    half each."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    return np.stack([cell(rng, size, label == 0) for label in labels]), labels


def photos(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """`n` random crops (uint8 [n, size, size, 3]) of scikit-learn's two sample photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    sources = load_sample_images().images
    out = []
    for i in range(n):
        photo = sources[i % len(sources)]
        side = int(rng.integers(size, min(photo.shape[:2])))
        y, x = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size))
        out.append(np.asarray(crop))
    return np.stack(out)


def write_cells(dest: Path, n: int, size: int, seed: int) -> Path:
    """The NIH layout: `dest/Parasitized/*.png`, `dest/Uninfected/*.png`."""
    from PIL import Image

    images, labels = cells(n, size, seed)
    for name in CLASSES:
        (dest / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(dest / CLASSES[label] / f"cell_{i:06d}.png")
    return dest
