"""A file whose reading never ends, as on a hung network mount: a command that has to read it
gets half-way and no further, so a test can kill it there on an event it observes (a shard or
an answer written) instead of after a guessed sleep."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def stuck_file(path: Path) -> Path:
    """A named pipe at `path` that nobody writes: opening it for reading waits forever."""
    os.mkfifo(path)
    return path


def release_readers(fifo: Path) -> bool:
    """True once nobody has `fifo` open for reading; else gives one reader an end of file
    (for `cluster_helpers.wait_for`, after the command was killed)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ENXIO:  # no reader left
            return True
        raise
    os.close(fd)
    return False
