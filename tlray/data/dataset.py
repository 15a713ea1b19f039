"""A prepared dataset: its dataset.json (`DatasetInfo`) and its Parquet shards, read back.

Layout of a prepared dataset directory (local path or any URI pyarrow understands):

    dataset.json                 classes, counts, image shape, source + hash, seed, fractions
    train/part-00000.parquet     one Parquet file per shard, several per split
    val/...  test/...            (and predict/ for unlabelled rows, in source order)

Each shard has three columns:
    image  fixed_size_binary(H*W*C)  raw uint8 pixels, row-major HWC (no image codec: reading
                                     is a memory copy, which keeps ingest far ahead of a GPU)
    label  int64                     index into dataset.json's "classes"; -1 when unlabelled
    id     string                    provenance: "train.csv:row 17" or the image's path

Writing one is `tlray.data.prepare`'s job.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tlray import __version__
from tlray.errors import TlrayError

FORMAT = "tlray-dataset"


FORMAT_VERSION = 1


SPLITS = ("train", "val", "test", "predict")


@dataclass
class SplitInfo:
    rows: int
    shards: list[str]
    class_counts: dict[str, int]


@dataclass
class DatasetInfo:
    """The contents of dataset.json, plus where the dataset lives."""

    uri: str
    name: str
    classes: list[str]
    height: int
    width: int
    channels: int
    mode: str
    splits: dict[str, SplitInfo]
    source: dict
    options: dict
    fingerprint: str
    skipped: list[dict] = field(default_factory=list)
    # Hidden and system files the source held ({"count": N, "examples": [...]}): not data.
    ignored: dict = field(default_factory=dict)
    created: str = ""
    tlray_version: str = __version__
    # A feature cache (tlray.model.feature_cache) reuses this layout for a frozen front's
    # outputs: `image` then holds float32 arrays of `shape`, and `features` says what
    # computed them.
    dtype: str = "uint8"
    shape: list[int] | None = None
    features: dict | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one row's array: (H, W, C) for images, `shape` for cached features."""
        return tuple(self.shape) if self.shape else (self.height, self.width, self.channels)

    def split_bytes(self, split: str) -> int:
        """Bytes of a split's arrays: what caching it in Ray's object store costs."""
        return (self.splits[split].rows * int(np.prod(self.image_shape))
                * np.dtype(self.dtype).itemsize)

    def shard_uris(self, split: str) -> list[str]:
        """Full paths/URIs of a split's shards, e.g. for `ray.data.read_parquet`."""
        if split not in self.splits:
            raise TlrayError(f"dataset {self.uri} has no {split!r} split (it has "
                             f"{', '.join(self.splits)})")
        return [join_uri(self.uri, s) for s in self.splits[split].shards]

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("uri")
        return {"format": FORMAT, "version": FORMAT_VERSION, **out}


def decode_images(column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...],
                  dtype: str | np.dtype = np.uint8) -> np.ndarray:
    """The `image` column (fixed-size binary) as a [N, *shape] array (uint8 HWC images, or
    a feature cache's float32 arrays), zero-copy."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    row_items = int(np.prod(shape))
    data = np.frombuffer(column.buffers()[1], dtype=dtype)
    start = column.offset * row_items
    return data[start:start + len(column) * row_items].reshape((len(column), *shape))


def encode_arrays(arrays: np.ndarray) -> pa.FixedSizeBinaryArray:
    """[N, ...] arrays as one fixed-size binary value per row (the `image` column)."""
    arrays = np.ascontiguousarray(arrays)
    row_bytes = arrays.itemsize * int(np.prod(arrays.shape[1:]))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(row_bytes), len(arrays),
                                                [None, pa.py_buffer(arrays.tobytes())])


def load_info(uri: str | os.PathLike) -> DatasetInfo:
    """Reads and checks a prepared dataset's dataset.json; explains what is wrong if anything."""
    uri = str(uri)
    fs, root = filesystem(uri)
    meta_path = join_uri(root, "dataset.json")
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.NotFound:
        raise TlrayError(f"dataset {uri!r} does not exist; create it with `tlray prepare SOURCE "
                         f"{uri}`")
    if fs.get_file_info(meta_path).type != pafs.FileType.File:
        raise TlrayError(f"{uri!r} is not a complete tlray dataset: dataset.json is missing (a "
                         f"prepare was interrupted, or this is another directory); re-run "
                         f"`tlray prepare SOURCE {uri} --force`")
    with fs.open_input_stream(meta_path) as f:
        try:
            meta = json.loads(f.read())
        except json.JSONDecodeError as e:
            raise TlrayError(f"{meta_path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise TlrayError(f"{meta_path}: not a tlray dataset description")
    meta.pop("format"), meta.pop("version", None)
    meta["splits"] = {k: SplitInfo(**v) for k, v in meta["splits"].items()}
    info = DatasetInfo(uri=uri, **meta)
    missing = [s for split in info.splits.values() for s in split.shards
               if fs.get_file_info(join_uri(root, s)).type != pafs.FileType.File]
    if missing:
        raise TlrayError(f"dataset {uri!r} is incomplete: shard {missing[0]} listed in "
                         f"dataset.json is missing ({len(missing)} missing); re-run "
                         f"`tlray prepare SOURCE {uri} --force`")
    return info


def filesystem(uri: str):
    """(filesystem, path) for a local path or a URI such as s3://bucket/prefix."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


def join_uri(root: str, rel: str) -> str:
    return root.rstrip("/") + "/" + rel


def temporary_sibling(root: str, tag: str) -> str:
    """A hidden, unique sibling path of `root`, where a new version is built before it is
    moved into place."""
    parent, _, base = root.rstrip("/").rpartition("/")
    return f"{parent}/.{base}.{tag}-{uuid.uuid4().hex[:8]}"


def read_shards(batch: pa.Table) -> pa.Table:
    """Reads the Parquet shards named in a batch's `path` column into one table.

    Ray Data runs this in its read tasks; it lives here, away from torch, so that those
    processes start in a fraction of a second and a fraction of the memory.
    """
    return pa.concat_tables([read_shard(uri) for uri in batch.column("path").to_pylist()])


def read_shard(uri: str) -> pa.Table:
    """One Parquet shard of a prepared dataset, as a table (columns image, label, id)."""
    fs, path = filesystem(uri)
    return pq.read_table(path, filesystem=fs)


def iter_split(info: DatasetInfo, split: str
               ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """A split's shards, in order, each as (uint8 NHWC images, labels, ids): for reading a
    split whole in one process (predicting, evaluating), not for training."""
    fs, _ = filesystem(info.uri)
    for uri in info.shard_uris(split):
        table = pq.read_table(filesystem(uri)[1], filesystem=fs, columns=["image", "label", "id"])
        yield (decode_images(table.column("image"), info.image_shape),
               table.column("label").to_numpy(), table.column("id").to_pylist())


def sample_per_class(info: DatasetInfo, split: str = "train", per_class: int = 1
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The first `per_class` images of every class in a split (uint8 NHWC, labels)."""
    fs, _ = filesystem(info.uri)
    wanted = {c: per_class for c in range(info.num_classes)}
    images, labels = [], []
    for uri in info.shard_uris(split):
        table = pq.read_table(filesystem(uri)[1], filesystem=fs, columns=["image", "label"])
        pixels = decode_images(table.column("image"), info.image_shape)
        for image, label in zip(pixels, table.column("label").to_numpy()):
            if wanted.get(int(label), 0) > 0:
                wanted[int(label)] -= 1
                images.append(image)
                labels.append(int(label))
        if not any(wanted.values()):
            break
    order = np.argsort(labels, kind="stable")
    return np.stack(images)[order], np.array(labels, dtype=np.int64)[order]
