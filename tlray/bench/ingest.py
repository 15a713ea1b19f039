"""Benchmarks that print a ratio against a baseline measured in the same run.

`ingest`: images/s of the Ray Data path that feeds Train workers, next to a plain
pyarrow/numpy read of the same shards into the same torch batches. Two Ray figures: streaming
from Parquet (every epoch of a dataset too large to cache), and streaming from the object
store after the split was read once (`read_split(cache=True)`, what training does for splits
up to `data.cache_gb`).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from tlray.data.pixel_sources import from_arrays
from tlray.data.dataset import DatasetInfo
from tlray.data.ingest import decode_images, iter_image_batches, read_split
from tlray.data.prepare import prepare

INGEST_CASES = {"28x28 grey": (28, 1, 60_000), "128x128 RGB": (128, 3, 10_000)}


@dataclass
class IngestResult:
    case: str
    rows: int
    plain_img_s: float
    ray_img_s: float  # streaming from Parquet, best of the repeats
    ray_cached_img_s: float  # streaming from the object store, best of the repeats
    ray_first_pass_img_s: float  # the very first pass, which also starts Ray's workers

    @property
    def ratio(self) -> float:
        return self.ray_img_s / self.plain_img_s

    @property
    def cached_ratio(self) -> float:
        return self.ray_cached_img_s / self.plain_img_s


def plain_read(info: DatasetInfo, split: str, batch_size: int) -> int:
    """The baseline: read each shard with pyarrow and cut it into the same torch batches."""
    rows = 0
    for uri in info.shard_uris(split):
        table = pq.read_table(uri, columns=["image", "label"])
        images = torch.from_numpy(decode_images(table.column("image"), info.image_shape))
        labels = torch.from_numpy(np.array(table.column("label"), dtype=np.int64))
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size], labels[start:start + batch_size]
            rows += len(batch[0])
    return rows


def ray_read(info: DatasetInfo, split: str, batch_size: int, dataset=None) -> int:
    """tlray's path: Ray Data from the shards to torch batches, as a Train worker sees it."""
    rows = 0
    for images, _ in iter_image_batches(dataset or read_split(info, split), info.image_shape,
                                        batch_size):
        rows += len(images)
    return rows


def _rate(fn, *args) -> float:
    start = time.perf_counter()
    rows = fn(*args)
    return rows / (time.perf_counter() - start)


def ingest(cases: dict[str, tuple[int, int, int]] | None = None, *, batch_size: int = 256,
           repeats: int = 3, seed: int = 0) -> list[IngestResult]:
    """Times both paths on synthetic shards of each case (side, channels, rows).

    The first Ray pass also pays for starting Ray's worker processes; it is reported apart,
    and the headline figure is the best of the following passes (an epoch in a long run).
    """
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rng = np.random.default_rng(seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="tlray-bench-") as tmp:
        for case, (side, channels, rows) in (cases or INGEST_CASES).items():
            images = rng.integers(0, 256, (rows, side, side, channels), dtype=np.uint8)
            info = prepare(from_arrays(images, rng.integers(0, 10, rows)),
                           f"{tmp}/{side}x{channels}", fractions={"train": 1.0},
                           progress=False)
            del images
            first = _rate(ray_read, info, "train", batch_size)
            plain = max(_rate(plain_read, info, "train", batch_size) for _ in range(repeats))
            ray_rate = max(_rate(ray_read, info, "train", batch_size) for _ in range(repeats))
            cached = read_split(info, "train", cache=True)
            cached_rate = max(_rate(ray_read, info, "train", batch_size, cached)
                              for _ in range(repeats))
            del cached
            results.append(IngestResult(case, rows, plain, ray_rate, cached_rate, first))
    return results


def format_ingest(results: list[IngestResult]) -> str:
    lines = [f"{'case':<14}{'rows':>8}{'plain img/s':>14}{'ray parquet':>13}{'ratio':>7}"
             f"{'ray cached':>12}{'ratio':>7}{'ray 1st pass':>14}"]
    for r in results:
        lines.append(f"{r.case:<14}{r.rows:>8}{r.plain_img_s:>14,.0f}{r.ray_img_s:>13,.0f}"
                     f"{r.ratio:>7.2f}{r.ray_cached_img_s:>12,.0f}{r.cached_ratio:>7.2f}"
                     f"{r.ray_first_pass_img_s:>14,.0f}")
    return "\n".join(lines)


def ingest_json(results: list[IngestResult]) -> str:
    return json.dumps([dict(asdict(r), ratio=r.ratio, cached_ratio=r.cached_ratio)
                       for r in results], indent=2)
