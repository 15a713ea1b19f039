"""What `tlray predict` scores, read the same way in this process and in Ray replicas.

Every source becomes `Inputs`: a table of references in the source's order (`refs`: one row per
image, or one per shard of a prepared dataset) and a picklable `reader` that turns a slice of
that table into batches for the model. The local loop and the Ray pipeline hand the same slices
to the same reader; they differ only in where it runs. The images are handed over as they are
(pixels, or the files' bytes): the model's pyfunc converts and resizes them itself.

Sources (kinds from `tlray.data.sources.locate`):
  - a prepared dataset (split `predict` if it has one, else `test`),
  - a pixel CSV: Kaggle's `test.csv` (pixel columns only), or a `train.csv`-style one with a
    `label` column (its labels are kept for the accuracy); a Kaggle competition directory
    holding `test.csv` means that file,
  - images: a folder (flat, or one sub-folder per class; a sub-folder named like one of the
    model's classes is taken as the true label), a `.zip` of one, or a single image file.
Folders, zips and datasets may be in an object store (`s3://`, `gs://`).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from tlray.data import folders
from tlray.data.dataset import decode_images, encode_arrays, load_info, read_shard
from tlray.data.source_images import IMAGE_EXTENSIONS
from tlray.data.sources import Location
from tlray.data.trees import FolderTree, SingleFile, ZipTree
from tlray.errors import TlrayError

SOURCES = ("a prepared dataset directory, a pixel CSV such as Kaggle's test.csv, an image "
           "folder or .zip, or an image file")


@dataclass
class Batch:
    """Images for one call of the model, and the rows they belong to.

    `images` holds the rows that could be read, in order: one uint8 [N, H, W, C] array of
    pixels, or a 1-D object array of N encoded files. `failures` maps the position (in `ids`)
    of each row that could not be read to what went wrong.
    """

    images: Any
    ids: list[str]
    labels: list[str | None]  # the true class where the source knows it
    failures: dict[int, str] = field(default_factory=dict)


@dataclass
class Inputs:
    description: str
    rows: int
    refs: pa.Table  # what to read, in the source's order
    reader: Callable[[pa.Table, int], Iterator[Batch]]  # (a slice of refs, batch size)
    kaggle: bool = False  # a Kaggle test set: the default output is a submission
    labelled: bool = False  # some rows have a true label
    row_numbers: bool = False  # ids end in ":row N" (Kaggle's ImageId)
    refs_per_block: int | None = None  # refs per Ray block (None: one batch's worth)


def open_inputs(where: Location, split: str | None, class_names: list[str]) -> Inputs:
    """The `Inputs` of a located source (see the module docstring)."""
    if split is not None and where.kind != "dataset":
        raise TlrayError(f"--split {split!r} applies to prepared datasets only, but "
                         f"{where.uri!r} is not one (no dataset.json)")
    if where.kind == "dataset":
        return _dataset_inputs(load_info(where.uri), split)
    if where.kind == "pixel-csv":
        return _csv_inputs(where.local_path)
    if where.kind == "kaggle":
        test = where.local_path / "test.csv"
        if not test.is_file():
            raise TlrayError(f"source {where.uri!r} holds no test.csv (its train.csv is what "
                             f"training learnt from); give the CSV to predict itself")
        return _csv_inputs(test)
    if where.kind in ("image-zip", "image-file", "image-folder"):
        tree = {"image-zip": ZipTree, "image-file": SingleFile,
                "image-folder": FolderTree}[where.kind](where.uri)
        return _image_inputs(tree, where.uri, class_names)
    if where.kind in ("mnist-idx", "builtin"):
        raise TlrayError(f"source {where.uri!r} ({where.kind}) is a labelled training source: "
                         f"prepare it first (`tlray prepare {where.uri}`) and predict the "
                         f"dataset's test split")
    raise TlrayError(f"source {where.uri!r} is a file but not a .csv, a .zip or an image "
                     f"({', '.join(sorted(IMAGE_EXTENSIONS))})")


# --------------------------------------------------------------------------- prepared datasets

@dataclass
class ShardReader:
    """Reads whole shards of a prepared dataset (refs: one `shard` URI per row)."""

    shape: tuple[int, ...]
    classes: list[str]

    def __call__(self, refs: pa.Table, batch_size: int) -> Iterator[Batch]:
        for uri in refs.column("shard").to_pylist():
            table = read_shard(uri)
            for start in range(0, table.num_rows, batch_size):
                chunk = table.slice(start, batch_size)
                labels = [self.classes[i] if i >= 0 else None
                          for i in chunk.column("label").to_numpy()]
                yield Batch(decode_images(chunk.column("image"), self.shape),
                            chunk.column("id").to_pylist(), labels)


def _dataset_inputs(info, split: str | None) -> Inputs:
    if split is None:
        split = next((s for s in ("predict", "test") if s in info.splits), None)
        if split is None:
            raise TlrayError(f"dataset {info.uri} has neither a predict nor a test split (it has "
                             f"{', '.join(info.splits)}); choose one with --split")
    shards = info.shard_uris(split)  # explains an unknown split
    if info.splits[split].rows == 0:
        raise TlrayError(f"dataset {info.uri}: split {split!r} has no rows")
    kaggle = info.source.get("kind") == "kaggle-csv" and split == "predict"
    return Inputs(f"dataset {info.uri}, split {split}", info.splits[split].rows,
                  pa.table({"shard": shards}), ShardReader(info.image_shape, info.classes),
                  kaggle=kaggle, labelled=sum(info.splits[split].class_counts.values()) > 0,
                  row_numbers=kaggle, refs_per_block=1)


# --------------------------------------------------------------------------- pixel CSVs

@dataclass
class PixelReader:
    """Rows of pixels carried in the refs themselves (column `image`, one row per image)."""

    shape: tuple[int, ...]

    def __call__(self, refs: pa.Table, batch_size: int) -> Iterator[Batch]:
        for start in range(0, refs.num_rows, batch_size):
            chunk = refs.slice(start, batch_size)
            yield Batch(decode_images(chunk.column("image"), self.shape),
                        chunk.column("id").to_pylist(), chunk.column("label").to_pylist())


def _csv_inputs(path: Path) -> Inputs:
    """A pixel CSV through the same reader (and validation) as `tlray prepare`."""
    from tlray.data import pixel_sources

    with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    labelled = bool(header) and header[0] == "label"
    images, raw = pixel_sources.read_pixel_csv(path, labelled=labelled)
    refs = pa.table({"image": encode_arrays(images),
                     "id": [f"{path.name}:row {i + 1}" for i in range(len(images))],
                     "label": pa.array([str(int(v)) for v in raw] if labelled
                                       else [None] * len(images), pa.string())})
    side = images.shape[1]
    return Inputs(f"{path} ({len(images)} rows of {side}x{side} grey pixels"
                  f"{', labelled' if labelled else ''})", len(images), refs,
                  PixelReader(images.shape[1:]), kaggle=not labelled, labelled=labelled,
                  row_numbers=True)


# --------------------------------------------------------------------------- image files

@dataclass
class FileReader:
    """Image files of a tree (refs: `id`, the file's path in it, and `label`); the model gets
    each file's bytes and decodes them itself."""

    tree: Any

    def __call__(self, refs: pa.Table, batch_size: int) -> Iterator[Batch]:
        with ThreadPoolExecutor(max_workers=8) as pool:
            for start in range(0, refs.num_rows, batch_size):
                chunk = refs.slice(start, batch_size)
                ids = chunk.column("id").to_pylist()
                data = list(pool.map(self._read, ids))
                failures = {i: d for i, d in enumerate(data) if isinstance(d, str)}
                files = np.empty(len(data) - len(failures), dtype=object)
                files[:] = [d for d in data if not isinstance(d, str)]
                yield Batch(files, ids, chunk.column("label").to_pylist(), failures)

    def _read(self, rel: str) -> bytes | str:
        try:
            return self.tree.read(rel)
        except OSError as e:
            return f"cannot read the file ({e})"


def _image_inputs(tree, source: str, class_names: list[str]) -> Inputs:
    """Image files anywhere under the folder, in sorted path order; other files are ignored."""
    files = tree.listing().files
    items = [f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    if not items:
        raise TlrayError(f"{tree.name}: no images found (expected files ending in "
                         f"{', '.join(sorted(IMAGE_EXTENSIONS))}, directly or in "
                         f"sub-folders; {len(files)} other file(s) there)")
    prefix = folders.class_root(items)
    known = set(class_names)
    labels: list[str | None] = []
    for rel in items:
        parts = rel[len(prefix):].split("/")
        labels.append(parts[0] if len(parts) >= 2 and parts[0] in known else None)
    labelled = sum(lab is not None for lab in labels)
    refs = pa.table({"id": items,
                     "label": pa.array(labels, pa.string())})
    return Inputs(f"{source} ({len(items)} images"
                  f"{f', {labelled} in class folders' if labelled else ''})", len(items),
                  refs, FileReader(tree), labelled=labelled > 0)
