"""A prepared dataset's Parquet shards: which rows go in which file (`plan_shards`), and writing
one (`write_shard`), the unit of work of `tlray prepare`, run in this process or in a Ray task.

The plan depends on the split and the options only, never on where or in how many tasks the
shards are written: the same source and seed give the same files, row for row. Only numpy,
pyarrow and Pillow are imported here and below (a Ray task that writes shards starts fast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tlray.data.dataset import encode_arrays, join_uri
from tlray.data.source_images import SourcePart

MAX_SHARD_BYTES = 64 << 20  # a shard is what one task holds in memory at a time
TARGET_SHARDS = 16  # per split, so that several workers (and tasks) each get several


@dataclass
class ShardJob:
    """One Parquet file of the dataset: the source rows it holds, in their order."""

    split: str
    index: int
    rows: np.ndarray  # positions in the source

    @property
    def path(self) -> str:
        return f"{self.split}/part-{self.index:05d}.parquet"


@dataclass
class ShardWritten:
    path: str
    rows: int
    class_counts: np.ndarray  # rows per label
    failures: list[tuple[str, str]]  # (id, what is wrong) of rows that did not decode


def plan_shards(splits: dict[str, np.ndarray], row_bytes: int,
                rows_per_shard: int | None) -> list[ShardJob]:
    """Each split cut into shards of `rows_per_shard` rows (default: ~16 per split, none over
    `MAX_SHARD_BYTES`)."""
    jobs = []
    for split, indices in splits.items():
        per_shard = rows_per_shard or max(1, min(math.ceil(len(indices) / TARGET_SHARDS),
                                                 MAX_SHARD_BYTES // row_bytes))
        for number, start in enumerate(range(0, len(indices), per_shard)):
            jobs.append(ShardJob(split, number, indices[start:start + per_shard]))
    return jobs


def write_shard(part: SourcePart, labels: np.ndarray, ids: np.ndarray, fs, dest: str,
                path: str, num_classes: int, write: bool = True) -> ShardWritten:
    """Loads a part of the source and writes it as the shard `path` under `dest` (or, with
    `write` false, only checks that it decodes). Rows that do not decode are left out and
    named in the result: whether that is allowed is the caller's decision."""
    images, failures = part.load()
    if failures:
        keep = np.ones(len(labels), bool)
        keep[[position for position, _ in failures]] = False
        failed = [(str(ids[position]), reason) for position, reason in failures]
        labels, ids = labels[keep], ids[keep]
    else:
        failed = []
    if write:
        row_bytes = int(np.prod(images.shape[1:]))
        schema = pa.schema([("image", pa.binary(row_bytes)), ("label", pa.int64()),
                            ("id", pa.string())])
        table = pa.Table.from_arrays([encode_arrays(images), pa.array(labels, pa.int64()),
                                      pa.array([str(i) for i in ids])], schema=schema)
        pq.write_table(table, join_uri(dest, path), filesystem=fs, compression="zstd",
                       compression_level=1)
    counts = np.bincount(labels[labels >= 0], minlength=num_classes)
    return ShardWritten(path, len(labels), counts, failed)
