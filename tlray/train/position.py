"""Checkpoints inside an epoch: when to write one, and where in the epoch it leaves a run.

Two things trigger one, at a step boundary:

- `train.checkpoint_every` (steps, or a span of time): bounds what a hard crash costs;
- a preemption notice (a node of the run is draining, e.g. a spot reclaim): Ray Train is
  asked every `scaling.notice_check_every` steps (a barrier across the workers, so every
  worker asks at the same steps; the training split is dealt in lockstep for that), and on
  the first notice a just-in-time checkpoint is written, and another just before the
  notice's deadline; training goes on until the node goes, and Ray Train restarts the run
  from the last of them.

A `Position` says how far into its epoch such a checkpoint is. A run resumed from it skips
the steps done (their batches are cut but not decoded) and starts the epoch's figures from
the sums so far, so every row is counted once. With the same number of workers each one is
dealt the same rows as before (one worker always; several when the training split is held
in memory, dealt by position), so the resumed run trains exactly what the uninterrupted run
would have. With a different number (an elastic resize), or several workers on a streamed
split, the rest of the epoch is dealt anew: it runs the steps left, but some of its rows may
be ones the first part already trained on and as many others are left out of that epoch.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tlray.config.interval import Every
from tlray.train.steps import EpochTotals, all_reduce

PERIODIC, PREEMPTION, DEADLINE = "periodic", "preemption", "preemption deadline"
LAST_STEP_TAG = "preemption_last_step"  # the last step seen while a node was draining


@dataclass(frozen=True)
class Position:
    """Where inside an epoch a checkpoint was written."""

    epoch: int  # the epoch in progress
    steps: int  # its steps done, on every worker
    world: int  # how many workers did them
    loss_sum: float  # the epoch's training sums so far, every worker's
    correct: float
    seen: int
    seconds: float  # time spent training in it so far
    why: str  # PERIODIC, PREEMPTION or DEADLINE

    def totals(self) -> EpochTotals:
        return EpochTotals(self.loss_sum, self.correct, self.seen)

    def steps_to_skip(self, world: int) -> int:
        """Steps of the epoch a resumed run with `world` workers leaves out: the same
        count with as many workers as before, else as many rows' worth."""
        return self.steps if world == self.world else round(self.steps * self.world / world)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def position_in(state_position: dict | None, epoch: int) -> Position | None:
    """The position a checkpoint holds, if it is inside `epoch`."""
    if not state_position or state_position["epoch"] != epoch:
        return None
    return Position(**state_position)


class MidEpochCheckpoints:
    """Decides at each step boundary whether to write a checkpoint now, and why.

    On a preemption notice: at once (`PREEMPTION`), and again from shortly before the
    notice's deadline (`DEADLINE`: once the time left is under twice what a checkpoint and
    the steps to the next check take, plus a second) until Ray Train stops the workers,
    each time the last checkpoint is older than a checkpoint takes to write: what the
    restarted run trains again is the last few steps, not all those since the notice, and
    training spends at most about half its time on checkpoints meanwhile.

    Every worker calls `due` after the same steps and gets the same answer: a notice comes
    from Ray Train to all of them alike, and a decision by the clock (a periodic checkpoint
    due by time, the deadline near) is agreed on with a max across workers at the
    notice-check steps.
    """

    def __init__(self, every: Every, check_every: int, notice: Callable[[], object | None],
                 world: int, device):
        self.every, self.check_every, self.notice = every, check_every, notice
        self.world, self.device = world, device
        self.last_step, self.last_time = 0, time.monotonic()
        self.noticed = None  # the preemption notice already acted on, in this attempt
        self.last_check, self.check_seconds, self.write_seconds = None, 0.0, 0.0

    def restart_clock(self, step: int) -> None:
        self.last_step, self.last_time = step, time.monotonic()

    def wrote(self, seconds: float) -> None:
        """How long the last checkpoint took to write and report."""
        self.write_seconds = max(self.write_seconds, seconds)

    def due(self, step: int) -> str | None:
        """PREEMPTION, DEADLINE, PERIODIC or None, after global step `step`."""
        checking = step % self.check_every == 0
        if checking:
            now = time.monotonic()
            if self.last_check is not None:
                self.check_seconds = max(self.check_seconds, now - self.last_check)
            self.last_check = now
            if self.noticed is None:
                self.noticed = self.notice()
                if self.noticed is not None:
                    return PREEMPTION
            elif self._agreed(self._deadline_near(now)):
                return DEADLINE
        if not self.every:
            return None
        since = step - self.last_step, time.monotonic() - self.last_time
        if self.every.steps or self.world == 1:
            return PERIODIC if self.every.due(*since) else None
        if not checking:  # by time, with several workers: agreed at the check steps
            return None
        return PERIODIC if self._agreed(self.every.due(*since)) else None

    def _deadline_near(self, now: float) -> bool:
        """Whether to checkpoint again: the deadline is near (or past: Ray restarts the run
        a little after it) and the last checkpoint is older than what one costs."""
        deadline_ms = getattr(self.noticed, "deadline_ms", None)
        if not deadline_ms:
            return False
        margin = 2 * (self.write_seconds + self.check_seconds) + 1.0
        return (time.time() >= deadline_ms / 1000 - margin
                and now - self.last_time >= max(self.write_seconds, self.check_seconds))

    def _agreed(self, mine: bool) -> bool:
        if self.world == 1:
            return mine
        flag = torch.tensor([float(mine)], device=self.device)
        return bool(all_reduce(flag, self.world, op="max").item())


def rescale_steps(state, world: int) -> bool:
    """Step counts in the new size's steps, when a run resumes with another number of
    workers (an elastic run): a step then trains on a different number of rows, and the
    schedule and warm-up, which count steps, must stand where the rows done put them.
    Returns whether the size changed."""
    old, state.world = state.world or world, world
    if old == world:
        return False
    state.step = round(state.step * old / world)
    state.phase_start_step = round(state.phase_start_step * old / world)
    return True


def note_preemption(logger, notice, state, say) -> None:
    """A preemption notice, in MLflow (rank 0's `EpochLogger`): when, which nodes and ranks,
    the deadline, the step of its just-in-time checkpoint, and the count so far."""
    record = {"noticed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": state.step,
              "epoch": state.position["epoch"],
              "nodes": getattr(notice, "preempted_node_ids", []),
              "ranks": getattr(notice, "preempted_ranks", []),
              "deadline_ms": getattr(notice, "deadline_ms", None)}
    logger.tag(f"preemption_{state.preemptions}", json.dumps(record))
    logger.log({"preemptions": state.preemptions}, state.step)
    say(f"preemption notice for node(s) {', '.join(n[:8] for n in record['nodes'])}: "
        f"checkpoint now, training goes on until the node goes")
