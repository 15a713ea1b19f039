"""Where an image source's files are, listed and read the same way wherever that is.

A folder on a local disk or in an object store (`s3://`, `gs://`, `file://`: anything
`pyarrow.fs.FileSystem.from_uri` opens), a `.zip` of one, or a single image file. Listing is
cheap (names, sizes, and modification times or CRCs: no pixels) and keeps only the names (a
million of them take ~80 MB); reading is one file at a time. Every tree pickles, so the
driver lists and Ray tasks read what it listed.
"""

from __future__ import annotations

import hashlib
import os
import threading
import zipfile
from dataclasses import dataclass, field
from typing import IO

import pyarrow.fs as pafs

from tlray.data.dataset import filesystem, join_uri
from tlray.data.source_images import IGNORED_NAMES
from tlray.errors import TlrayError


def is_ignored(rel: str) -> bool:
    """Hidden and system files (`.DS_Store`, `Thumbs.db`, dot-files, `__MACOSX/`): never data."""
    parts = rel.split("/")
    return (any(p.startswith(".") or p == "__MACOSX" for p in parts)
            or parts[-1].lower() in IGNORED_NAMES)


@dataclass
class Listing:
    """What a tree holds, gathered in one pass: the files that may be data (POSIX paths
    relative to the tree, in listing order), the ignored ones, every folder, and a fingerprint
    of the files (names, sizes, modification times or CRCs: it changes with any of them)."""

    files: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    _digest: object = field(default_factory=lambda: hashlib.sha256(b"["), repr=False)

    def add(self, rel: str, size: int, stamp: int) -> None:
        if is_ignored(rel):
            self.ignored.append(rel)
            return
        # The digest of `repr(list of (rel, size, stamp))`, taken piece by piece.
        self._digest.update(((", " if self.files else "") + repr((rel, size, stamp))).encode())
        self.files.append(rel)

    @property
    def fingerprint(self) -> str:
        digest = self._digest.copy()
        digest.update(b"]")
        return digest.hexdigest()


class FolderTree:
    """A folder and everything under it, addressed by POSIX-style relative paths."""

    kind = "image-folder"

    def __init__(self, uri: str):
        self.name = uri
        self.fs, self.root = filesystem(uri)
        self.local = "://" not in uri

    def listing(self) -> Listing:
        return self._walk() if self.local else self._select()

    def _walk(self) -> Listing:
        """A local folder, top-down in name order. What cannot be looked at (a dangling
        link, say) is still listed, so that reading it fails and is reported: pyarrow's
        listing would leave it out without a word."""
        listing = Listing()
        for path, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            rel = os.path.relpath(path, self.root).replace(os.sep, "/")
            prefix = "" if rel == "." else rel + "/"
            listing.folders += [prefix + d for d in dirnames]
            for name in sorted(filenames):
                try:
                    st = os.stat(os.path.join(path, name))
                    listing.add(prefix + name, st.st_size, st.st_mtime_ns)
                except OSError:
                    listing.add(prefix + name, -1, 0)
        return listing

    def _select(self) -> Listing:
        """A folder in an object store (or any URI), through pyarrow's filesystem."""
        start = len(self.root.rstrip("/")) + 1
        entries = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True))
        entries.sort(key=lambda e: e.path)
        listing = Listing()
        for entry in entries:
            if entry.type == pafs.FileType.Directory:
                listing.folders.append(entry.path[start:])
            else:
                listing.add(entry.path[start:], entry.size or 0, entry.mtime_ns or 0)
        return listing

    def read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(join_uri(self.root, rel)) as f:
            return f.read()

    def open(self, rel: str) -> IO[bytes]:
        """A seekable file: an image's header is read without reading the whole file."""
        return self.fs.open_input_file(join_uri(self.root, rel))


class ZipTree:
    """A .zip of an image folder (local or in an object store), read without extracting it."""

    kind = "image-zip"

    def __init__(self, uri: str):
        self.name = uri
        self.fs, self.path = filesystem(uri)
        self._local = threading.local()
        self._zip()  # a broken archive fails now, not in a task

    def _zip(self) -> zipfile.ZipFile:
        # ZipFile objects are not safe to share between threads: one per thread, opened once
        # (opening parses the whole central directory).
        archive = getattr(self._local, "zip", None)
        if archive is None:
            try:
                archive = zipfile.ZipFile(self.fs.open_input_file(self.path))
            except zipfile.BadZipFile as e:
                raise TlrayError(f"{self.name}: not a valid zip archive ({e})") from None
            self._local.zip = archive
        return archive

    def __getstate__(self) -> dict:
        return {"name": self.name, "fs": self.fs, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def listing(self) -> Listing:
        infos = self._zip().infolist()
        listing = Listing()
        for i in sorted((i for i in infos if not i.is_dir()), key=lambda i: i.filename):
            listing.add(i.filename, i.file_size, i.CRC)
        named = {i.filename.rstrip("/") for i in infos if i.is_dir()}
        named |= {f.rsplit("/", 1)[0] for f in listing.files + listing.ignored if "/" in f}
        parents = {"/".join(d.split("/")[:k]) for d in named for k in range(1, d.count("/") + 1)}
        listing.folders = sorted(named | parents)
        return listing

    def read(self, rel: str) -> bytes:
        return self._zip().read(rel)

    def open(self, rel: str) -> IO[bytes]:
        return self._zip().open(rel)


class SingleFile:
    """One image file, as a tree holding just it."""

    kind = "image-file"

    def __init__(self, uri: str):
        self.name = uri
        self.fs, self.path = filesystem(uri)

    def listing(self) -> Listing:
        info = self.fs.get_file_info(self.path)
        listing = Listing()
        listing.add(info.base_name, info.size or 0, info.mtime_ns or 0)
        return listing

    def read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def open(self, rel: str) -> IO[bytes]:
        return self.fs.open_input_file(self.path)
