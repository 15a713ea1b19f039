"""Where an image source's files are, listed and read the same way wherever that is.

A folder on a local disk or in an object store (`s3://`, `gs://`, `file://`: anything
`pyarrow.fs.FileSystem.from_uri` opens), a `.zip` of one, or a single image file. Listing is
cheap (names, sizes, and modification times or CRCs: no pixels); reading is one file at a
time. Every tree pickles, so the driver lists and Ray tasks read what it listed.
"""

from __future__ import annotations

import os
import threading
import zipfile
from typing import IO

import pyarrow.fs as pafs

from tlray.data.dataset import filesystem, join_uri
from tlray.errors import TlrayError

File = tuple[str, int, int]  # (POSIX path relative to the tree, size, mtime_ns or CRC)


class FolderTree:
    """A folder and everything under it, addressed by POSIX-style relative paths."""

    kind = "image-folder"

    def __init__(self, uri: str):
        self.name = uri
        self.fs, self.root = filesystem(uri)
        self.local = "://" not in uri

    def listing(self) -> tuple[list[File], list[str]]:
        """(every file; every folder), in one pass over the tree."""
        return self._walk() if self.local else self._select()

    def _walk(self) -> tuple[list[File], list[str]]:
        """A local folder, top-down in name order. What cannot be looked at (a dangling
        link, say) is still listed, so that reading it fails and is reported: pyarrow's
        listing would leave it out without a word."""
        files, folders = [], []
        for path, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            rel = os.path.relpath(path, self.root).replace(os.sep, "/")
            prefix = "" if rel == "." else rel + "/"
            folders += [prefix + d for d in dirnames]
            for name in sorted(filenames):
                try:
                    st = os.stat(os.path.join(path, name))
                    files.append((prefix + name, st.st_size, st.st_mtime_ns))
                except OSError:
                    files.append((prefix + name, -1, 0))
        return files, folders

    def _select(self) -> tuple[list[File], list[str]]:
        """A folder in an object store (or any URI), through pyarrow's filesystem."""
        start = len(self.root.rstrip("/")) + 1
        files, folders = [], []
        for entry in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True)):
            if entry.type == pafs.FileType.Directory:
                folders.append(entry.path[start:])
            else:
                files.append((entry.path[start:], entry.size or 0, entry.mtime_ns or 0))
        return sorted(files), sorted(folders)

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

    def listing(self) -> tuple[list[File], list[str]]:
        infos = self._zip().infolist()
        files = sorted((i.filename, i.file_size, i.CRC) for i in infos if not i.is_dir())
        named = {i.filename.rstrip("/") for i in infos if i.is_dir()}
        named |= {f.rsplit("/", 1)[0] for f, _, _ in files if "/" in f}
        parents = {"/".join(d.split("/")[:k]) for d in named for k in range(1, d.count("/") + 1)}
        return files, sorted(named | parents)

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

    def listing(self) -> tuple[list[File], list[str]]:
        info = self.fs.get_file_info(self.path)
        return [(info.base_name, info.size or 0, info.mtime_ns or 0)], []

    def read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def open(self, rel: str) -> IO[bytes]:
        return self.fs.open_input_file(self.path)
