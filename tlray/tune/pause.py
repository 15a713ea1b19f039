"""Ctrl-C during a sweep is a pause, never an ending.

The first Ctrl-C asks Tune to end its loop the way Tune itself would (trials stopped, their
last checkpoints and the experiment state saved); the sweep then registers nothing, ends its
MLflow runs KILLED and says how to continue (`interrupted`). A second Ctrl-C stops at once,
and says how to continue too: every trial resumes from the last checkpoint it reported.
Ray's own hint (`Tuner.restore(...)`, code a tlray user never writes) stays out of the
console.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys

from tlray.errors import Paused


class PauseOnCtrlC:
    """Around `tuner.fit()` in the main thread: `paused` says whether Ctrl-C stopped it."""

    def __init__(self) -> None:
        self.paused = False

    def __enter__(self) -> PauseOnCtrlC:
        # Tune's own SIGINT handler stops the sweep and prints a restore hint; tlray's does
        # the stopping through Tune's other stop signal, SIGUSR1, and says the rest itself.
        self._env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self._sigint = signal.signal(signal.SIGINT, self._on_ctrl_c)
        self._sigusr1 = signal.getsignal(signal.SIGUSR1)
        self._quiet = _RestoreHintFilter()
        logging.getLogger("ray.tune.tune").addFilter(self._quiet)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        signal.signal(signal.SIGINT, self._sigint)
        signal.signal(signal.SIGUSR1, self._sigusr1)
        logging.getLogger("ray.tune.tune").removeFilter(self._quiet)
        if self._env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._env
        if self.paused and exc_type is KeyboardInterrupt:
            raise Paused(f"stopped at once; every trial kept its last checkpoint; continue "
                         f"with: {resume_command()}") from None

    def _on_ctrl_c(self, signum, frame) -> None:
        if self.paused:
            raise KeyboardInterrupt  # the second Ctrl-C: stop at once
        self.paused = True
        print("pausing the sweep: its trials stop and their progress is saved (Ctrl-C again "
              "stops at once)", file=sys.stderr, flush=True)
        if callable(signal.getsignal(signal.SIGUSR1)):  # Tune's loop is running
            os.kill(os.getpid(), signal.SIGUSR1)
        else:
            raise KeyboardInterrupt


class _RestoreHintFilter(logging.Filter):
    HIDDEN = ("Resume experiment with", "Stop signal received", "Trials did not complete")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.HIDDEN)


def command_line(argv: list[str] | None = None) -> list[str]:
    """The command the user ran, as they would type it again (not the interpreter's view of
    it: `python -m tlray.cli ...` rather than the path of `tlray/cli/__main__.py`)."""
    argv = list(sys.argv if argv is None else argv)
    program = os.path.basename(argv[0])
    if program == "tlray":
        head = ["tlray"]
    elif argv[0].endswith(os.path.join("tlray", "cli", "__main__.py")):
        head = ["python", "-m", "tlray.cli"]
    else:
        head = ["python", argv[0]]
    return [*head, *argv[1:]]


def resume_command(argv: list[str] | None = None) -> str:
    """The command the user ran, with `--resume`: how to continue a paused sweep."""
    return shlex.join([*(a for a in command_line(argv) if a != "--resume"), "--resume"])
