"""Test-only faults in the training loop, switched on by an environment variable and never by
a user setting: `TLRAY_TEST_FAULT=ACTION:rank=R:step=S[:run=SUFFIX][:until=PATH]`.

  kill   the worker of rank R SIGKILLs itself at global step S, once per run (a marker file
         keeps the restarted workers alive): proves that a run resumes from its checkpoint;
  raise  it raises a KeyError there, an internal error: proves that a bug keeps its
         traceback (exit status 1, the innermost frame on stderr, a FAILED MLflow run);
  fail   it raises a RuntimeError there, once per run: proves that a run in the driver's
         own process (`tlray.train.in_driver`), where a kill would end the command, resumes
         from its checkpoint;
  hold   in a run of one worker, that worker waits after step S until PATH exists: an
         elastic run that grows meanwhile restarts with more workers, which pass step S
         without waiting. So a test of growing sees it happen at a known step, however long
         a new node takes to come up, instead of racing the run to its end.

With `run=SUFFIX` only runs whose restart key ends so are hit: in a sweep, one trial
(`run=_00002`, the third) and not the others.

The driver reads the variable once, in its preflight, and hands it to the workers in their
`WorkerArgs`: a variable set after the Ray cluster started would not reach them otherwise.
"""

from __future__ import annotations

import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

ENV = "TLRAY_TEST_FAULT"


@dataclass(frozen=True)
class Fault:
    action: str  # "kill" | "raise" | "fail" | "hold"
    rank: int
    step: int
    run: str = ""  # a suffix of the restart keys it hits ("": every run)
    until: str = ""  # hold: the file that ends the wait

    @classmethod
    def parse(cls, spec: str) -> Fault:
        action, *fields = spec.split(":")
        values = dict(f.split("=", 1) for f in fields)
        known = {"rank", "step"} <= set(values) <= {"rank", "step", "run", "until"}
        if action not in ("kill", "raise", "fail", "hold") or not known or (
                action == "hold") != ("until" in values):
            raise ValueError(f"{ENV}={spec!r}: expected kill|raise|fail:rank=R:step=S"
                             "[:run=SUFFIX] or hold:rank=R:step=S:until=PATH")
        return cls(action, int(values["rank"]), int(values["step"]), values.get("run", ""),
                   values.get("until", ""))


def from_env() -> str | None:
    """The fault the driver hands its workers (checked here, so a typo fails at once)."""
    spec = os.environ.get(ENV) or None
    if spec is not None:
        Fault.parse(spec)
    return spec


def maybe_fail(spec: str | None, rank: int, step: int, restart_key: str,
               world: int = 1) -> None:
    """At a step boundary: the configured fault, if this is its rank and step."""
    if spec is None:
        return
    fault = Fault.parse(spec)
    if fault.rank != rank or fault.step != step or not restart_key.endswith(fault.run):
        return
    if fault.action == "raise":
        raise KeyError(f"test fault at step {step}")
    if fault.action == "fail":
        if _first_time("failed", restart_key):
            raise RuntimeError(f"test failure at step {step}")
        return
    if fault.action == "hold":
        if world == 1:
            _hold(Path(fault.until))
        return
    _die_once(restart_key)


def _hold(until: Path) -> None:
    """Waits until `until` exists (or Ray Train restarts this worker's group), once every
    checkpoint reported so far is registered: a restart resumes from the latest."""
    import time

    import ray.train

    ray.train.get_all_reported_checkpoints()
    while not until.exists():
        time.sleep(0.2)


def _die_once(restart_key: str) -> None:
    """SIGKILL this process, once per run.

    Waits until Ray Train has registered every checkpoint reported so far, so that what is
    tested is the resume, not a race with the controller.
    """
    import ray.train

    if not _first_time("killed", restart_key, ray.train.get_all_reported_checkpoints):
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _first_time(what: str, restart_key: str, before=lambda: None) -> bool:
    """True the first time a run (by its restart key) gets here, after `before()`; a marker
    file remembers it across the run's restarts."""
    marker = Path(tempfile.gettempdir()) / f"tlray-{what}-{restart_key}"
    if marker.exists():
        return False
    before()
    marker.touch()
    return True
