"""A budgeted sweep's trial ends its training in time (`tune.budget`).

The sweep gives each trial a `Deadline`: the moment its last epoch must have ended, so that
its test and logging and the sweep's own end still fit in the budget. After each epoch the
trial asks whether its next one would end by then, timed by what it measured itself at that
epoch's frozen depth, else by the sweep's calibration; if not, it stops there and is tested
on its best weights, as after early stopping.

The driver's `BudgetGuard` keeps a trial that could not end in time from starting; this
keeps a started one from running past the budget when its epochs turn out slower than
calibrated (seen: two trials side by side on 2 cores took 1.2-1.5x the calibration's
epochs, and a 2-minute sweep ended at 2m23s).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tlray.config.schedule import depth_at


@dataclass(frozen=True)
class Deadline:
    ends_at: float  # time.time() by which the trial's last epoch must have ended
    epoch_s: dict[str, float]  # the plan's seconds for an epoch at each frozen depth

    def next_epoch_fits(self, freeze: str, history: list[dict], now: float) -> bool:
        """Whether the epoch after `history` (the rows so far) ends by `ends_at`."""
        depth = depth_at(freeze, len(history) + 1)
        timed = [row["epoch_seconds"] for row in history
                 if depth_at(freeze, row["epoch"]) == depth]
        seconds = timed[-1] if timed else self.epoch_s.get(depth, max(self.epoch_s.values()))
        return now + seconds <= self.ends_at

    def describe(self, now: float) -> str:
        return (f"stopping: the next epoch would end after the sweep's budget allows "
                f"({max(0.0, self.ends_at - now):.0f}s were left for it)")


def out_of_time(deadline: Deadline | None, freeze: str, history: list[dict], world: int,
                device) -> bool:
    """Whether the run stops here for its deadline; every worker gets the same answer (the
    first to run out of time decides for all, as their clocks differ by a little)."""
    if deadline is None:
        return False
    late = not deadline.next_epoch_fits(freeze, history, time.time())
    if world > 1:
        import torch

        flag = torch.tensor([float(late)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        late = bool(flag.item())
    return late
