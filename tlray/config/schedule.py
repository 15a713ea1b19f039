"""Freeze schedules: how much of the backbone stays frozen, phase by phase.

`model.freeze` is one depth (`3`, `all`: the whole run at that depth) or phases separated by
commas, each `DEPTH[:EPOCHS][@LR_SCALE]`: `all:1,0@0.5` trains only the head for one epoch,
then everything for the rest of the run at half the learning rate (fastai's `fine_tune`);
`all:2,5:2,0@0.3` goes in three steps. The last phase may leave out its epochs (it takes what
is left of `train.epochs`). Each phase gets its own optimizer and learning-rate schedule,
peaking at `optim.lr` x its scale. A sweep searches schedules like depths:
`tune.freeze=0;all:1,0@0.5` (choices separated by `;` once one holds a comma).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tlray.errors import TlrayError

_PHASE = re.compile(r"^(?P<depth>all|\d+)(?::(?P<epochs>\d+))?(?:@(?P<scale>[0-9.eE+-]+))?$")


@dataclass(frozen=True)
class Phase:
    depth: str  # frozen coarse groups from the stem: "0" .. "N", or "all"
    epochs: int | None  # None: the rest of the run (the last phase only)
    lr_scale: float = 1.0


def parse(text: str, epochs: int | None = None, *, key: str = "model.freeze") -> list[Phase]:
    """The phases of a schedule; `epochs` (train.epochs) checks that every phase gets some."""
    phases = []
    for part in (p.strip() for p in str(text).split(",")):
        match = _PHASE.match(part)
        if not match:
            raise TlrayError(f"--{key}: {part!r} is not a phase: expected DEPTH[:EPOCHS]"
                             f"[@LR_SCALE] (a number of groups or 'all', e.g. all:1,0@0.5)")
        scale = float(match["scale"]) if match["scale"] else 1.0
        if not scale > 0:
            raise TlrayError(f"--{key}: learning-rate scale {match['scale']!r} must be > 0")
        phases.append(Phase(match["depth"], int(match["epochs"]) if match["epochs"] else None,
                            scale))
    if any(p.epochs is None for p in phases[:-1]) or any(p.epochs == 0 for p in phases):
        raise TlrayError(f"--{key}: {text!r}: every phase but the last needs its epochs "
                         f"(DEPTH:EPOCHS), at least 1")
    if epochs is not None and len(phases) > 1:
        given = sum(p.epochs or 0 for p in phases)
        if given > epochs or (given == epochs and phases[-1].epochs is None):
            raise TlrayError(f"--{key}: {text!r} needs more than the {epochs} epochs of "
                             f"--train.epochs")
    return phases


def phase_at(phases: list[Phase], epoch: int) -> int:
    """The index of the phase that epoch `epoch` (1-based) trains in."""
    end = 0
    for index, phase in enumerate(phases):
        end += phase.epochs or 10**9
        if epoch <= end:
            return index
    return len(phases) - 1


def depth_at(text: str, epoch: int) -> str:
    """The frozen depth epoch `epoch` (1-based) of a schedule trains at."""
    phases = parse(text)
    return phases[phase_at(phases, epoch)].depth


def phase_epochs(phases: list[Phase], index: int, total: int) -> tuple[int, int]:
    """(first epoch, number of epochs) of phase `index` in a run of `total` epochs."""
    start = 1 + sum(p.epochs or 0 for p in phases[:index])
    count = phases[index].epochs or total - start + 1
    return start, min(count, total - start + 1)


def choices(text: str) -> list[str]:
    """A sweep's freeze choices: separated by `;` when one of them is a schedule, else `,`."""
    separator = ";" if ";" in text or ":" in text or "@" in text else ","
    return [c.strip() for c in text.split(separator) if c.strip()]


def first_depth(text: str) -> str:
    """The frozen depth a run starts at: a schedule's first phase's (what the model is built
    with, what the feature cache caches, what the sweep plots)."""
    return parse(text)[0].depth
