"""Augmentation settings: the named presets and what each draws per image (no torch here).

`data.augment` names a preset; the `data.augment_*` fields override its values. The
augmenter that applies them on the training device is `tlray.data.augment.Augmenter`.
"""

from __future__ import annotations

import dataclasses

from tlray.errors import TlrayError

AUTO = "auto"  # a preset chosen from the dataset when a run starts (tlray.data.augment_choice)
PRESETS: dict[str, dict[str, float | bool]] = {
    "none": {},
    "digits": {"rotate": 10.0, "shift": 0.1, "scale": 0.1},
    "natural": {"crop": 0.35, "hflip": True},
    "microscopy": {"dihedral": True, "scale": 0.1},
}


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """What is drawn per image. Zero / False is off."""

    rotate: float = 0.0  # degrees, uniform in [-rotate, rotate]
    shift: float = 0.0  # fraction of the side, uniform in [-shift, shift] on each axis
    scale: float = 0.0  # zoom, uniform in [1 - scale, 1 + scale]
    crop: float = 0.0  # random resized crop: area fraction uniform in [crop, 1]; 0: none
    hflip: bool = False  # mirror left-right, half the time
    dihedral: bool = False  # one of the 8 flips / quarter turns, uniformly

    @property
    def enabled(self) -> bool:
        return self != Augmentation()

    @property
    def affine(self) -> bool:
        return bool(self.rotate or self.shift or self.scale or self.crop or self.hflip)

    def describe(self) -> str:
        parts = [f"{name} {value:g}" for name, value in (("rotate", self.rotate),
                                                         ("shift", self.shift),
                                                         ("scale", self.scale),
                                                         ("crop", self.crop)) if value]
        parts += [name for name in ("hflip", "dihedral") if getattr(self, name)]
        return ", ".join(parts) or "none"


def from_config(data, preset: str | None = None) -> Augmentation:
    """The preset in `data.augment` (or `preset`) with the `data.augment_*` fields that are
    set on top. `auto` must have been decided from the dataset first (the preflight does)."""
    preset = preset or data.augment
    if preset == AUTO:
        raise TlrayError("--data.augment=auto is decided from the dataset when a run starts; "
                         f"name a preset here ({', '.join(PRESETS)})")
    if preset not in PRESETS:
        raise TlrayError(f"--data.augment: expected {AUTO} or one of {', '.join(PRESETS)}, "
                         f"got {preset!r}")
    values = dict(PRESETS[preset])
    for field in dataclasses.fields(Augmentation):
        override = getattr(data, f"augment_{field.name}")
        if override is not None:
            values[field.name] = override
    aug = Augmentation(**values)
    checks = [(0 <= aug.rotate <= 180, "rotate", "degrees in [0, 180]"),
              (0 <= aug.shift <= 0.5, "shift", "a fraction in [0, 0.5]"),
              (0 <= aug.scale < 1, "scale", "a fraction in [0, 1)"),
              (aug.crop == 0 or 0 < aug.crop <= 1, "crop", "an area fraction in (0, 1], "
                                                           "or 0 for no crop")]
    for ok, name, expected in checks:
        if not ok:
            raise TlrayError(f"--data.augment_{name}: expected {expected}, got "
                             f"{getattr(aug, name)!r}")
    return aug
