"""Spans of time written as a person would (`90s`, `10m`, `1h30m`, `4h`), read and written
here only: `train.checkpoint_every` (a count of steps, or a span) and `tune.budget`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from tlray.errors import TlrayError

_NUMBER = r"\d+(?:\.\d+)?"
# Hours, minutes, seconds, largest first, each optional: 1h30m, 2m, 90s, 1m30s.
_SPAN = re.compile(rf"^(?:(?P<h>{_NUMBER})h)?(?:(?P<m>{_NUMBER})m(?:in)?)?"
                   rf"(?:(?P<s>{_NUMBER})s(?:ec)?)?$")
_PLAIN = re.compile(rf"^{_NUMBER}$")
BUDGET_FORMS = "90s, 2m, 20m, 1h30m, 4h or plain seconds"


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


def span_seconds(text) -> float | None:
    """The seconds in a span with units (`90s`, `10m`, `1h30m`), or None if it is not one."""
    compact = re.sub(r"\s+", "", str(text)).lower()
    match = _SPAN.match(compact)
    if not compact or match is None:
        return None
    hours, minutes, seconds = (float(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def parse_every(text, key: str = "train.checkpoint_every") -> Every:
    """`200` (steps), `10m` (minutes), `90s` (seconds), `0` (never)."""
    plain = str(text).strip()
    if _PLAIN.match(plain):
        if float(plain) != int(float(plain)):
            raise TlrayError(f"--{key}: a count of steps is a whole number, got {text!r}")
        return Every(steps=int(float(plain)))
    seconds = span_seconds(text)
    if seconds is None:
        raise TlrayError(f"--{key}: expected steps (200), minutes (10m) or seconds (90s), "
                         f"got {text!r}")
    return Every(seconds=seconds)


def parse_budget(text, key: str = "tune.budget") -> float | None:
    """Seconds of a time budget; None (also empty or `none`) means no budget."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return None
    plain = str(text).strip()
    seconds = float(plain) if _PLAIN.match(plain) else span_seconds(plain)
    if seconds is None or seconds <= 0:
        raise TlrayError(f"--{key}: expected a time such as {BUDGET_FORMS}, got {text!r}")
    return seconds


def format_span(seconds: float) -> str:
    """`2m`, `1h30m`, `1m30s`: a span in the form `parse_budget` reads, zero parts left out."""
    total = max(0, int(math.ceil(seconds)))
    parts = zip((total // 3600, total % 3600 // 60, total % 60), "hms")
    return "".join(f"{n}{unit}" for n, unit in parts if n) or "0s"


# A budget to suggest, rounded up to steps a person would type: 10 s under a minute, half
# minutes under ten, whole minutes under an hour, quarter hours beyond.
_ROUND_STEPS = ((60, 10), (600, 30), (3600, 60), (math.inf, 900))


def round_up_span(seconds: float) -> float:
    """`seconds` rounded up to the next step a person would type (see _ROUND_STEPS)."""
    step = next(step for below, step in _ROUND_STEPS if seconds < below)
    return math.ceil(seconds / step) * step
