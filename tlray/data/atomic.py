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


def commit(fs, tmp: str, root: str) -> None:
    """Moves the finished `tmp` to `root`; an existing `root` is set aside until then (a
    crash between the two moves is repaired by the next `remove_leftovers`)."""
    old = None
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        old = temporary_sibling(root, "old")
        fs.move(root, old)
    fs.move(tmp, root)
    if old is not None:
        discard(fs, old)


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
