"""Augmentation presets on real batches (no Ray): what each draws, that labels survive it,
that it is exact where it says so, random per image, and repeatable."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tlray import config
from tlray.config.augmentation import Augmentation
from tlray.config.augmentation import from_config as augmentation_from_config
from tlray.data import augment
from tlray.data.preprocess import resize, to_model_input
from tlray.errors import TlrayError


def _augmenter(preset: str, *overrides: str, seed: int = 0, rank: int = 0):
    cfg = config.load(None, [f"--data.augment={preset}", *overrides])
    return augment.Augmenter(augmentation_from_config(cfg.data), seed, rank)


def _linear(theta: torch.Tensor) -> torch.Tensor:
    return theta[:, :, :2]


def test_digits_rotate_shift_and_zoom_a_little_and_never_mirror():
    theta = _augmenter("digits").matrices(4096)
    a = _linear(theta)
    det = torch.linalg.det(a)
    assert (det > 0).all()  # no reflection: a flipped 2, 3 or 7 is another shape
    zoom = 1 / det.sqrt()  # isotropic: det = (1/zoom)^2
    assert zoom.min() >= 0.9 - 1e-6 and zoom.max() <= 1.1 + 1e-6
    angle = torch.atan2(a[:, 1, 0], a[:, 0, 0]) * 180 / math.pi
    assert angle.abs().max() <= 10 + 1e-4 and angle.abs().max() > 9  # the whole range is used
    shift = theta[:, :, 2] / 2  # normalised coordinates span 2
    assert shift.abs().max() <= 0.1 + 1e-6 and shift.abs().max() > 0.09


def test_natural_crops_inside_the_image_and_mirrors_half():
    theta = _augmenter("natural").matrices(4096)
    sx, sy = theta[:, 0, 0], theta[:, 1, 1]
    area = (sx * sy).abs()
    assert area.min() >= 0.35 - 1e-6 and area.max() <= 1 + 1e-6
    assert (theta[:, 0, 1] == 0).all() and (theta[:, 1, 0] == 0).all()  # no rotation
    # The sampled window [t - |s|, t + |s|] stays inside [-1, 1]: no black borders.
    assert (theta[:, 0, 2].abs() + sx.abs() <= 1 + 1e-6).all()
    assert (theta[:, 1, 2].abs() + sy.abs() <= 1 + 1e-6).all()
    mirrored = (sx < 0).float().mean()
    assert 0.45 < mirrored < 0.55


def _dihedral_variants(image: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for t in (image, image.transpose(-1, -2)):
        out += [t, t.flip(-1), t.flip(-2), t.flip(-1).flip(-2)]
    return out


def test_microscopy_outputs_are_exact_dihedral_transforms_of_the_input():
    images = torch.rand(256, 3, 20, 20)
    out = _augmenter("microscopy", "--data.augment_scale=0")(images, (20, 20))
    seen = set()
    for image, result in zip(images, out):
        variants = _dihedral_variants(image)
        matches = [k for k, v in enumerate(variants) if torch.equal(v, result)]
        assert matches, "not one of the 8 symmetries of the square, pixel for pixel"
        seen.add(matches[0])
    assert seen == set(range(8))  # all 8 are drawn
    # With its mild zoom on (the preset), the images differ from any exact symmetry.
    zoomed = _augmenter("microscopy")(images, (20, 20))
    assert not all(any(torch.equal(v, z) for v in _dihedral_variants(i))
                   for i, z in zip(images, zoomed))


def test_parameters_differ_image_by_image_and_runs_repeat():
    same = torch.rand(1, 1, 28, 28).repeat(16, 1, 1, 1)
    out = _augmenter("digits", seed=3)(same, (32, 32))
    flat = out.flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == 16  # every copy augmented its own way
    again = _augmenter("digits", seed=3)(same, (32, 32))
    assert torch.equal(out, again)  # same seed, same draws
    other_rank = _augmenter("digits", seed=3, rank=1)(same, (32, 32))
    assert not torch.equal(out, other_rank)  # each worker its own stream


def test_digits_keep_the_digit_where_it_is():
    """A bright bar at the left edge stays on the left: shifts and turns are small, and no
    preset but natural and microscopy ever mirrors."""
    images = torch.zeros(512, 1, 28, 28)
    images[:, :, 6:22, 3:7] = 1.0
    out = _augmenter("digits")(images, (28, 28))
    columns = torch.arange(28, dtype=torch.float32)
    centre = (out.sum(dim=(1, 2)) * columns).sum(1) / out.sum(dim=(1, 2, 3))
    assert centre.max() < 9 and centre.min() > 1  # the bar's centre is at 4.5


def test_no_augmentation_is_the_plain_resize_and_eval_input_never_changes():
    images = torch.randint(0, 256, (4, 28, 28, 1), dtype=torch.uint8)
    plain = to_model_input(images, (0.5,), (0.5,), (32, 32))
    none = augment.Augmenter(Augmentation(), seed=0)
    torch.testing.assert_close(to_model_input(images, (0.5,), (0.5,), (32, 32), augment=none),
                               plain, rtol=0, atol=0)
    expected = (resize(images.permute(0, 3, 1, 2).float() / 255, (32, 32)) - 0.5) / 0.5
    torch.testing.assert_close(plain, expected)


def test_preset_fields_override_and_bad_values_are_refused():
    cfg = config.load(None, ["--data.augment=digits", "--data.augment_rotate=25",
                             "--data.augment_hflip=true"])
    aug = augmentation_from_config(cfg.data)
    assert (aug.rotate, aug.shift, aug.hflip) == (25, 0.1, True)
    assert augmentation_from_config(config.load(None, []).data) == Augmentation()
    for bad, expected in (("--data.augment=cats", "expected one of auto, none, digits, natural"),
                          ("--data.augment_shift=0.6", "augment_shift: expected a fraction"),
                          ("--data.augment_crop=1.5", "augment_crop: expected an area"),
                          ("--data.augment_rotate=-3", "augment_rotate: expected degrees")):
        with pytest.raises(TlrayError, match=expected):
            config.load(None, [bad])


def test_augmented_batches_run_on_whatever_device_they_are_on():
    images = torch.randint(0, 256, (8, 40, 30, 3), dtype=torch.uint8)
    x = to_model_input(images, (0.5,) * 3, (0.25,) * 3, (24, 24),
                       augment=_augmenter("natural"))
    assert x.shape == (8, 3, 24, 24) and torch.isfinite(x).all()
    # Normalised pixels of 0-255: in [(0 - 0.5) / 0.25, (1 - 0.5) / 0.25].
    assert float(x.min()) >= -2 - 1e-5 and float(x.max()) <= 2 + 1e-5


def test_auto_picks_the_preset_that_suits_the_data_and_says_why(tmp_path):
    from tlray.bench.standins import cells, photos
    from tlray.data.pixel_sources import builtin_mnist_arrays, from_arrays
    from tlray.data.augment_choice import choose_augmentation
    from tlray.data.prepare import prepare

    def chosen(images, name):
        labels = np.arange(len(images)) % 2
        return choose_augmentation(prepare(from_arrays(images, labels), tmp_path / name,
                                           progress=False))

    digits, _ = builtin_mnist_arrays()
    preset, why = chosen(np.ascontiguousarray(digits[:60]), "digits")
    assert preset == "digits" and "never mirrored" in why and "28x28" in why
    preset, why = chosen(cells(60, 48)[0], "cells")
    assert preset == "microscopy" and "plain background" in why
    preset, why = chosen(photos(60, 48), "photos")
    assert preset == "natural" and "mirrored left-right" in why
