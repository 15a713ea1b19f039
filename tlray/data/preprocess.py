"""Pixels to model input: the one implementation that training, evaluation and serving share.

Everything a trained network sees goes through here, whether it comes from a Parquet shard on
a Train worker or from a PNG posted to MLflow's scoring server: uint8 pixels in the model's
channel mode (`to_mode`, `to_channels`), then `to_model_input` (resize to the input size,
scale to [0, 1], normalise with the weights' mean and std). Sharing it is what makes a served
prediction equal the one made at test time.

Only torch, numpy and Pillow are imported: a logged model ships this module (see
`tlray.serve.pyfunc`) and must load where nothing else of tlray's dependencies is installed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tlray.data.pixels import MODES, to_mode  # noqa: F401  (re-exported for the pyfunc)


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [..., H, W, C] images (C = 1, 3 or 4) with `channels` (1 or 3) channels.

    Grey -> RGB repeats the channel; RGB -> grey is PIL's "L" (ITU-R 601-2 luma, bit-exact
    with `Image.convert("L")`, i.e. with `tlray prepare --mode L`); RGBA goes through `to_mode`
    image by image, as a decoded RGBA file would.
    """
    have = images.shape[-1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    if have == 3 and channels == 1:
        rgb = images.astype(np.uint32)
        luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
        return luma.astype(np.uint8)[..., None]
    if have == 4 and channels in MODES:
        flat = images.reshape(-1, *images.shape[-3:])
        out = np.stack([to_mode(Image.fromarray(im, "RGBA"), MODES[channels]) for im in flat])
        return out.reshape(*images.shape[:-1], channels)
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels "
                     f"(expected 1 grey, 3 RGB or 4 RGBA channels)")


def resize(x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Float [N, C, H, W] at `size` (bilinear, antialiased when shrinking); as is when None.

    Each image is resized on its own, so a batch's composition never changes a result.
    """
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=bool(x.shape[-1] > size[-1]))


def to_model_input(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                   size: tuple[int, int] | None = None, *, channels_last: bool = False,
                   augment=None) -> torch.Tensor:
    """uint8 [N,H,W,C] -> normalised float [N,C,h,w] at the model's input size.

    Runs as a handful of whole-batch tensor ops on whatever device `images` is on.
    `augment` (training only, a `tlray.data.augment.Augmenter`) replaces the resize: it resizes
    and augments in the same step, before the normalisation.
    """
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if augment is not None:
        x = augment(x, tuple(size) if size is not None else tuple(x.shape[-2:]))
    else:
        x = resize(x, size)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


TTA_VIEWS = {"none": 1, "flip": 2, "dihedral": 8}


def tta_views(x: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """The views of a model-input batch [N, C, H, W] that test-time augmentation averages:
    `none` the batch itself; `flip` it and its mirror image; `dihedral` the 8 flips and
    quarter turns (a square input keeps its shape)."""
    if kind == "none":
        return [x]
    if kind == "flip":
        return [x, x.flip(-1)]
    if kind == "dihedral":
        turns = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
        return turns + [t.flip(-1) for t in turns]
    raise ValueError(f"test-time augmentation {kind!r}: expected one of {', '.join(TTA_VIEWS)}")


def tta_probabilities(network, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Softmax probabilities [N, classes], averaged over the test-time views of `x`."""
    views = tta_views(x, kind)
    return sum(torch.softmax(network(v).float(), dim=1) for v in views) / len(views)
