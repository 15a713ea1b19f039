"""Outputs that are complete or absent: each is built in a hidden temporary sibling of its
destination (`.NAME.tmp-XXXXXXXX`) and moved into place at the end, so a crash, a Ctrl-C or a
killed process never leaves half of one where the real one belongs.

Used for prepared datasets (a folder) and for prediction outputs (a CSV file or a folder of
Parquet shards), on a local disk or in an object store.
"""

from __future__ import annotations

import shutil
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
