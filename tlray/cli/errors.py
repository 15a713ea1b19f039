"""How a command ends when something goes wrong.

What the user can fix (a `TlrayError`, however deep inside Ray it was raised) is one line on
stderr and exit status 2. Ctrl-C is one line and exit status 130 (a sweep's says how to
continue it). Anything else is a bug in
tlray: exit status 1, the root cause with its innermost frames (file:line), and where the
full traceback is (an artifact of the MLflow run, which ended FAILED, or a file under
$TLRAY_HOME/logs when no run was open).
"""

from __future__ import annotations

import re
import sys
import time
import traceback
from collections.abc import Callable

from tlray import paths
from tlray.errors import Paused, TlrayError, traceback_text

USER_ERROR, INTERNAL_ERROR, INTERRUPTED = 2, 1, 130
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
INNERMOST_FRAMES = 3


def run_guarded(command: Callable[[], int | None], prog: str) -> int:
    """Runs `command`; turns how it fails into the line(s) and exit status above."""
    try:
        return command() or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Paused as paused:
        print(f"{prog}: {paused}", file=sys.stderr)
        return INTERRUPTED
    except Exception as error:  # noqa: BLE001 - every failure is explained below, none hidden
        root, remote_trace = root_cause(error)
        if isinstance(root, TlrayError):
            print(f"{prog}: error: {root}", file=sys.stderr)
            return USER_ERROR
        print(internal_report(prog, error, root, remote_trace), file=sys.stderr)
        return INTERNAL_ERROR


def root_cause(error: BaseException) -> tuple[BaseException, str | None]:
    """The exception at the bottom of Ray's wrappers and `raise ... from` chains, and the
    traceback text of the process it was raised in when that was another process."""
    remote_trace, seen = None, set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)  # Ray Train's WorkerGroupError
        if failures:
            remote_trace = str(error)
            error = failures[min(failures)]
        elif getattr(error, "controller_failure", None) is not None:
            error = error.controller_failure
        elif type(error).__name__.startswith("RayTaskError") and hasattr(error, "cause"):
            remote_trace = str(error)
            error = error.cause
        elif error.__cause__ is not None:
            error = error.__cause__
        else:
            break
    return error, remote_trace


def innermost_frames(root: BaseException, remote_trace: str | None) -> list[str]:
    """`file:line in function` of the last frames before the error, innermost last."""
    if root.__traceback__ is not None:
        frames = [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(root.__traceback__)]
    else:
        frames = [(m[0], int(m[1]), m[2]) for m in _FRAME.findall(remote_trace or "")]
    return [f"{file}:{line} in {name}" for file, line, name in frames[-INNERMOST_FRAMES:]]


def internal_report(prog: str, error: BaseException, root: BaseException,
                    remote_trace: str | None) -> str:
    lines = [f"{prog}: internal error (a bug in tlray, not in your input): "
             f"{type(root).__name__}: {root}"]
    lines += [f"  {frame}" for frame in innermost_frames(root, remote_trace)]
    notes = [n for e in (error, root) for n in getattr(e, "__notes__", [])]
    if notes:
        lines += [f"  {n}" for n in dict.fromkeys(notes)]
    else:
        lines.append(f"  full traceback: {_save_traceback(error)}")
    return "\n".join(lines)


def _save_traceback(error: BaseException) -> str:
    logs = paths.home() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"error-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    path.write_text(traceback_text(error))
    return str(path)
