"""`train.checkpoint_every`: a count of steps, or a span of time, written as a person would."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tlray.errors import TlrayError

_FORM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m|min|s|sec)?\s*$")


@dataclass(frozen=True)
class Every:
    """Every `steps` optimizer steps, or every `seconds`; neither: never."""

    steps: int = 0
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.steps or self.seconds)

    def due(self, steps_since: int, seconds_since: float) -> bool:
        return bool(self.steps and steps_since >= self.steps
                    or self.seconds and seconds_since >= self.seconds)


def parse_every(text, key: str = "train.checkpoint_every") -> Every:
    """`200` (steps), `10m` (minutes), `90s` (seconds), `0` (never)."""
    match = _FORM.match(str(text))
    if match is None:
        raise TlrayError(f"--{key}: expected steps (200), minutes (10m) or seconds (90s), "
                         f"got {text!r}")
    number, unit = float(match[1]), match[2]
    if unit is None:
        if number != int(number):
            raise TlrayError(f"--{key}: a count of steps is a whole number, got {text!r}")
        return Every(steps=int(number))
    return Every(seconds=number * (60 if unit.startswith("m") else 1))
