"""Outputs that are complete or absent: each is built in a hidden temporary sibling of its
destination (`.NAME.tmp-XXXXXXXX`) and moved into place at the end, so a crash, a Ctrl-C or a
killed process never leaves half of one where the real one belongs.

Used for prepared datasets (a folder) and for prediction outputs (a CSV file or a folder of
Parquet shards), on a local disk or in an object store; `build_lock` keeps to one builder
of an output that several processes may want at once (a feature cache).
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.fs as pafs

from tlray.data.dataset import temporary_sibling


def begin(fs, root: str, *, folder: bool) -> str:
    """A new temporary sibling of `root` (created empty when it is to be a folder)."""
    parent = root.rstrip("/").rpartition("/")[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = temporary_sibling(root, "tmp")
    if folder:
        fs.create_dir(tmp, recursive=True)
    return tmp


def discard(fs, tmp: str) -> None:
    """Removes a temporary sibling that will not be moved into place."""
    kind = fs.get_file_info(tmp).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(tmp)
    elif kind != pafs.FileType.NotFound:
        fs.delete_file(tmp)


def commit(fs, tmp: str, root: str, *, last: str | None = None) -> None:
    """Moves the finished `tmp` to `root`; an existing `root` is set aside until then (a
    crash between the two moves is repaired by the next `remove_leftovers`).

    An object store cannot rename a folder (S3 has no folders): its objects are copied one by
    one instead, the file named `last` (a dataset's dataset.json, without which it is not
    taken for a dataset) after all the others, and then removed from `tmp`.
    """
    old = None
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        old = temporary_sibling(root, "old")
        _move(fs, root, old, last)
    _move(fs, tmp, root, last)
    if old is not None:
        discard(fs, old)


def _move(fs, src: str, dest: str, last: str | None) -> None:
    if type(fs).__name__ == "LocalFileSystem" or \
            fs.get_file_info(src).type != pafs.FileType.Directory:
        fs.move(src, dest)
        return
    files = [e.path for e in fs.get_file_info(pafs.FileSelector(src, recursive=True))
             if e.type == pafs.FileType.File]
    base = src.strip("/")
    for path in sorted(files, key=lambda p: p.rsplit("/", 1)[-1] == last):
        target = dest.rstrip("/") + path.strip("/")[len(base):]
        fs.create_dir(target.rpartition("/")[0], recursive=True)
        fs.copy_file(path, target)
    fs.delete_dir(src)


def remove_leftovers(dest: str) -> None:
    """Puts back an output that a process set aside and died before replacing, and removes
    what interrupted runs left in temporary siblings (local paths only: an object store has
    no such leftovers to trust)."""
    if "://" in dest:
        return
    root = Path(dest).expanduser().absolute()
    if not root.parent.exists():
        return
    for old in sorted(root.parent.glob(f".{root.name}.old-*")):
        if not root.exists():
            old.rename(root)
        elif old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    for stale in root.parent.glob(f".{root.name}.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def build_lock(uri: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """One build per cache: an exclusive lock on a file beside it, held while it is built.

    Runs that need the same cache at the same moment (a sweep's trials of one depth) wait
    for the first one's build and then read it. The operating system releases the lock of
    a process that dies, so a failed build blocks nobody. On storage without file locks
    (s3://) nothing is held: such builds may run twice (the results are identical).
    """
    if "://" in uri:
        yield
        return
    path = Path(uri).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
