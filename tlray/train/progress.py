"""What a person watching a run sees: one line per epoch from rank 0, a progress line on long
epochs, a bar on a terminal. Lines go to stdout themselves (not `print`, which Ray Train tees
into a duplicate) and match `PROGRESS_LINES`, which Ray's log dedup must never fold."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

from tlray.train.protocol import EpochMetrics

# The console lines below, optionally after a sweep trial's `label: `.
PROGRESS_LINES = r"^(\S+: )?(epoch \d+/\d+ |early stopping: |resumed from the checkpoint)"


def say_line(line: str, label: str | None = None) -> None:
    """One line to the console, after `label: ` when there is one; not `print`, which Ray
    Train tees into a duplicate line."""
    sys.stdout.write(f"{label + ': ' if label else ''}{line}\n")
    sys.stdout.flush()


class EpochTicker:
    """A progress line for long epochs: once an epoch has run `after_s`, at most one every
    `every_s`, with the images done, the rate and the epoch's ETA. An epoch shorter than
    `after_s` says nothing but its end-of-epoch line."""

    def __init__(self, epoch: int, epochs: int, total: int, say: Callable | None,
                 start: float, *, after_s: float = 20.0, every_s: float = 15.0,
                 clock: Callable[[], float] = time.perf_counter):
        self.epoch, self.epochs, self.total, self.say = epoch, epochs, total, say
        self.start, self.after_s, self.every_s, self.clock = start, after_s, every_s, clock
        self.next_at = start + after_s

    def tick(self, done: int) -> None:
        """`done`: images of this epoch trained so far, all workers together."""
        if self.say is None:
            return
        now = self.clock()
        if now < self.next_at:
            return
        self.next_at = now + self.every_s
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        self.say(f"epoch {self.epoch}/{self.epochs}  {min(done, self.total):,}/{self.total:,} "
                 f"images  {rate:,.0f} img/s  ETA {format_seconds(eta)}")


def format_seconds(seconds: float) -> str:
    """12s, 3m05s, 1h02m: a duration as a person reads it."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(row: EpochMetrics, epochs: int) -> str:
    return (f"epoch {row.epoch}/{epochs}  train_loss {row.train_loss:.4f}  "
            f"train_acc {row.train_acc:.4f}  val_loss {row.val_loss:.4f}  "
            f"val_acc {row.val_acc:.4f}  val_auc {row.val_auc:.4f}  "
            f"{row.img_per_s:,.0f} img/s  {row.epoch_seconds:.1f}s")


def progress_bar(show: bool, total: int, epoch: int, epochs: int):
    """A tqdm bar over an epoch's batches when `show`, else one that shows nothing."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False,
                mininterval=1.0, file=sys.stdout, disable=not show)
