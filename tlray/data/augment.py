"""Training-time augmentation: random, per image, on whole batches on the training device.

`data.augment` names a preset; the `data.augment_*` fields override its values. Each
training image gets its own draw:

  - `none`: nothing (the default);
  - `digits`: rotation within +-10 degrees, shift within +-10% of the side, zoom 0.9-1.1;
    never mirrored (a mirrored 2 is no 2);
  - `natural`: a random resized crop of 35-100% of the area (aspect 3/4 to 4/3), mirrored
    left-right half the time;
  - `microscopy`: one of the 8 flips / quarter turns (a cell has no up or left), zoom 0.9-1.1.

A batch costs a few kernels, whatever its size: one `affine_grid` + `grid_sample` with a
matrix per image (rotation, shift, zoom, crop and flip folded into one), which also resizes
to the model's input size; the dihedral group as three masked selects of exact flips and a
transpose, so those outputs are exact copies of the input's pixels. Out-of-image pixels are
black (the background of digits and cells). The random numbers come from the augmenter's own
CPU generator, seeded by `train.seed` and the worker's rank: runs repeat, and augmentation
does not disturb the data order. Validation, test and served images are never augmented.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tlray.config.augmentation import Augmentation
from tlray.data.preprocess import resize

ASPECT = (3 / 4, 4 / 3)  # of a random resized crop, as torchvision's RandomResizedCrop


class Augmenter:
    """Applies an Augmentation to float [N, C, H, W] batches in [0, 1]."""

    def __init__(self, aug: Augmentation, seed: int, rank: int = 0):
        self.aug = aug
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)

    def __call__(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The batch at the model's input `size`, each image augmented its own way."""
        if self.aug.affine:
            theta = self.matrices(len(x)).to(x.device, x.dtype, non_blocking=True)
            grid = F.affine_grid(theta, [len(x), x.shape[1], *size], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)
        else:
            x = resize(x, size)
        if self.aug.dihedral:
            x = self.dihedral(x)
        return x

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=self.generator)

    def matrices(self, n: int) -> torch.Tensor:
        """[n, 2, 3] affine_grid matrices: where in the input each output pixel samples."""
        a = self.aug
        angle = self._uniform(n, -a.rotate, a.rotate) * (math.pi / 180)
        zoom = self._uniform(n, 1 - a.scale, 1 + a.scale)
        # Sampling a window 1/zoom wide shows the content zoom times larger.
        sx = sy = 1 / zoom
        if a.crop:
            area = self._uniform(n, a.crop, 1.0)
            ratio = torch.exp(self._uniform(n, math.log(ASPECT[0]), math.log(ASPECT[1])))
            sx = sx * torch.sqrt(area * ratio).clamp(max=1.0)
            sy = sy * torch.sqrt(area / ratio).clamp(max=1.0)
        # A crop's centre stays where the whole window is inside the image.
        tx = self._uniform(n, -1, 1) * (1 - sx).clamp(min=0) if a.crop else torch.zeros(n)
        ty = self._uniform(n, -1, 1) * (1 - sy).clamp(min=0) if a.crop else torch.zeros(n)
        tx = tx + self._uniform(n, -2 * a.shift, 2 * a.shift)  # normalised side is 2 long
        ty = ty + self._uniform(n, -2 * a.shift, 2 * a.shift)
        if a.hflip:
            sx = sx * torch.where(torch.rand(n, generator=self.generator) < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        return torch.stack([torch.stack([sx * cos, -sy * sin, tx], dim=1),
                            torch.stack([sx * sin, sy * cos, ty], dim=1)], dim=1)

    def dihedral(self, x: torch.Tensor) -> torch.Tensor:
        """Each image through one of the 8 symmetries of a square: exact pixel moves."""
        bits = torch.rand(len(x), 3, generator=self.generator) < 0.5
        masks = [b.to(x.device, non_blocking=True).view(-1, 1, 1, 1) for b in bits.unbind(1)]
        x = torch.where(masks[0], x.transpose(-1, -2), x)
        x = torch.where(masks[1], x.flip(-1), x)
        return torch.where(masks[2], x.flip(-2), x)


def preview(images, aug: Augmentation, size: int, copies: int = 7, seed: int = 0):
    """uint8 [N, 1 + copies, size, size, C]: each image as the model sees it, then `copies`
    augmented draws of it, to look at what a preset does (`tlray augment-preview`)."""
    import numpy as np

    batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    drawn = Augmenter(aug, seed)
    columns = [resize(batch, (size, size))]
    columns += [drawn(batch, (size, size)) for _ in range(copies)]
    out = torch.stack(columns, dim=1).clamp(0, 1).mul(255).round().to(torch.uint8)
    return out.permute(0, 1, 3, 4, 2).numpy()
