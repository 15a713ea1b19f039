"""The one exception type a user should ever see from tlray, and the traceback of any other.

Anything the user can fix (a bad path, a malformed file, a wrong option) is raised as a
`TlrayError` with a message that names the file, row or option and what was expected. The CLI
prints these as one line and exits with status 2 instead of a traceback. Anything else is a
bug and keeps its traceback (`tlray.cli.errors`).
"""

import traceback


class TlrayError(ValueError):
    """A problem with the user's input or environment, explained in the message."""


def traceback_text(error: BaseException) -> str:
    """The whole story of an error: this process's traceback, with the tracebacks Ray carried
    over from other processes (worker, trial) in its messages."""
    return "".join(traceback.format_exception(error))


class Paused(Exception):
    """Work the user stopped (Ctrl-C) and that was kept: the message says how to continue.
    The CLI prints it as one line and exits with status 130."""
