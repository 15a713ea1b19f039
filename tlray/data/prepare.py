"""Preparing a dataset: a validated source, split and written as Parquet shards + dataset.json.

The source is listed and split here, on the driver; its shards are decoded and written by
`tlray.data.shards.write_shard`, either in this process or in Ray tasks across the cluster
(`engine`). Both write the same files: the split and the shards' contents depend on the source,
the seed and the options only. dataset.json is written last, and the whole directory is built
in a temporary sibling and renamed into place (`tlray.data.atomic`), so a dataset directory is
either complete or absent. The format itself is described in `tlray.data.dataset`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from contextlib import closing
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
from tqdm.auto import tqdm

from tlray import paths
from tlray.data import atomic
from tlray.data.dataset import (
    FORMAT_VERSION,
    DatasetInfo,
    SplitInfo,
    filesystem,
    join_uri,
    load_info,
)
from tlray.data.executors import Auto, InProcess, OnRay, RayPaysFrom
from tlray.data.shards import ShardJob, ShardWritten, plan_shards, write_shard
from tlray.data.source_images import BUILTIN_MNIST, SourceImages
from tlray.data.sources import open_source
from tlray.data.splits import split_indices
from tlray.errors import TlrayError

DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
ENGINES = ("auto", "local", "ray")
# `engine="auto"` decodes a folder or zip of this many images or more in Ray tasks. Measured
# with `tlray benchmark prepare` on the 2-core laptop (20,000 RGB PNGs, 96 -> 64 px): the
# in-process path decodes on both cores already (1,500-1,600 img/s, Ray 1,650 once running),
# so Ray finishes first only from ~280,000 images with Ray running, ~990,000 starting it.
RAY_FROM_IMAGES = RayPaysFrom(running=280_000, starting=1_000_000)


def default_path(name: str) -> Path:
    return paths.datasets_dir() / name


def prepare(
    source: str | SourceImages,
    dest: str | os.PathLike | None = None,
    *,
    fractions: dict[str, float] | None = None,
    seed: int = 42,
    image_size: tuple[int, int] | None = None,
    mode: str | None = None,
    classes: list[str] | None = None,
    rows_per_shard: int | None = None,
    skip_corrupt: bool = False,
    force: bool = False,
    name: str | None = None,
    progress: bool = True,
    engine: str = "local",
    connect=None,
) -> DatasetInfo:
    """Validates `source` and writes it as a prepared dataset at `dest`.

    Re-running on an unchanged source with the same options is a no-op; a changed source or
    `force` rebuilds. The previous dataset stays intact until the new one is complete.

    Args:
        source: see `tlray.data.sources.open_source`, or an already opened `SourceImages`.
        dest: output directory; defaults to `$TLRAY_HOME/datasets/<name>`.
        fractions: split fractions for the rows the source does not assign itself, e.g.
            {"train": 0.6, "val": 0.2, "test": 0.2}. When the source brings its own test set
            (MNIST IDX), only train and val are drawn. Defaults to 0.8/0.1/0.1.
        seed: seeds the stratified split and the shuffling of rows into shards.
        image_size, mode, classes: see `open_source`.
        rows_per_shard: rows per Parquet file; default aims at ~16 shards per split.
        skip_corrupt: leave out (and list) images that cannot be decoded instead of failing.
        force: rebuild even if an identical dataset exists.
        name: dataset name recorded in dataset.json (default: the destination's name).
        progress: show a bar while writing.
        engine: "local" (the default here) decodes and writes in this process, "ray" in Ray
            tasks on the cluster, "auto" (the CLI's default) on Ray for image folders and
            zips of `RAY_FROM_IMAGES` images or more.
        connect: joins or starts Ray before its first task. The CLI passes tlray's
            `init_ray`; the default is a plain `ray.init()`, which a later `init_ray` in the
            same process (a training run) would then not redo.
    """
    fractions = check_fractions(fractions or dict(DEFAULT_FRACTIONS))
    if rows_per_shard is not None and rows_per_shard < 1:
        raise TlrayError(f"--rows-per-shard must be at least 1, got {rows_per_shard}")
    executor = executor_for(engine, connect)
    if dest is None:
        dest = default_path(name or _default_name(
            source.uri if isinstance(source, SourceImages) else source))
    dest = str(dest)
    name = name or Path(dest.rstrip("/")).name
    atomic.remove_leftovers(dest)

    src = source if isinstance(source, SourceImages) else open_source(
        source, image_size=image_size, mode=mode, classes=classes, executor=executor)
    options = {"seed": seed, "fractions": fractions, "image_size": image_size, "mode": mode,
               "classes": classes, "rows_per_shard": rows_per_shard,
               "skip_corrupt": skip_corrupt}
    fingerprint = hashlib.sha256(json.dumps(
        {"source": src.fingerprint, "options": options, "format": FORMAT_VERSION},
        sort_keys=True).encode()).hexdigest()
    fs, root = filesystem(dest)
    existing = _existing(fs, root, dest, force)
    if existing is not None and existing.fingerprint == fingerprint:
        if progress:
            print(f"{dest}: up to date (same source and options), nothing to do")
        return existing

    splits = split_indices(src, fractions, seed)
    jobs = plan_shards(splits, src.height * src.width * src.channels, rows_per_shard)
    tmp = atomic.begin(fs, root, folder=True)
    try:
        for split in splits:
            fs.create_dir(join_uri(tmp, split))
        # Problems already known stop the prepare: the shards are then only checked, so
        # that the error names every problem of the source, not just the first ones found.
        written = _write_shards(executor, fs, tmp, src, jobs,
                                write=not src.problems.fatal(skip_corrupt), progress=progress)
        for shard in written:
            for item, reason in shard.failures:
                src.problems.add(item, "unreadable", reason)
        skipped = src.problems.raise_or_skip(skip_corrupt)
        info = DatasetInfo(
            uri=dest, name=name, classes=src.class_names, height=src.height, width=src.width,
            channels=src.channels, mode=src.mode, splits=_split_infos(splits, jobs, written,
                                                                      src.class_names),
            source={"kind": src.kind, "uri": src.uri, "fingerprint": src.fingerprint},
            options=options, fingerprint=fingerprint,
            skipped=[asdict(s) for s in skipped],
            ignored={"count": len(src.ignored), "examples": src.ignored[:20]}
            if src.ignored else {},
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        with fs.open_output_stream(join_uri(tmp, "dataset.json")) as f:
            f.write(json.dumps(info.to_json(), indent=2).encode())
        atomic.commit(fs, tmp, root, last="dataset.json")
    except BaseException:
        atomic.discard(fs, tmp)
        raise
    if skipped and progress:
        print(f"skipped {len(skipped)} unreadable item(s) (listed in dataset.json):",
              file=sys.stderr)
        for s in skipped[:20]:
            print(f"  {s.item}: {s.reason}", file=sys.stderr)
    return load_info(dest)


def executor_for(engine: str, connect=None):
    """Where the shards are decoded and written (see `prepare`'s `engine`)."""
    if engine not in ENGINES:
        raise TlrayError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "local":
        return InProcess()
    if engine == "ray":
        return OnRay(connect)
    return Auto(InProcess(), OnRay(connect), RAY_FROM_IMAGES.now())


def _existing(fs, root: str, dest: str, force: bool) -> DatasetInfo | None:
    """The complete dataset already at `dest`, if any; something else there is an error
    (unless `force`)."""
    if force or fs.get_file_info(root).type == pafs.FileType.NotFound:
        return None
    try:
        return load_info(dest)
    except TlrayError:
        if (fs.get_file_info(join_uri(root, "dataset.json")).type == pafs.FileType.NotFound
                and fs.get_file_info(pafs.FileSelector(root, recursive=False))):
            raise TlrayError(f"{dest!r} exists and is not a complete tlray dataset; replace "
                             f"it with `tlray prepare SOURCE {dest} --force`") from None
        return None


def _write_shards(executor, fs, tmp: str, src: SourceImages, jobs: list[ShardJob], *,
                  write: bool, progress: bool) -> list[ShardWritten]:
    """Every shard of the plan, decoded and written (or only checked) on `executor`."""
    calls = ((src.part(job.rows), src.labels[job.rows], src.ids[job.rows], fs, tmp, job.path,
              len(src.class_names), write) for job in jobs)
    written: list[ShardWritten] = [None] * len(jobs)  # type: ignore[list-item]
    with tqdm(total=sum(len(job.rows) for job in jobs), unit="img", desc="prepare",
              disable=not progress, leave=False) as bar, \
            closing(executor.map(write_shard, calls, images=len(src.labels) if src.decodes
                                 else 0, what="tlray prepare")) as results:
        for number, shard in results:
            written[number] = shard
            bar.update(len(jobs[number].rows))
    return written


def _split_infos(splits: dict[str, np.ndarray], jobs: list[ShardJob],
                 written: list[ShardWritten], classes: list[str]) -> dict[str, SplitInfo]:
    out = {}
    for split in splits:
        mine = [shard for job, shard in zip(jobs, written) if job.split == split]
        counts = sum((s.class_counts for s in mine), np.zeros(len(classes), np.int64))
        out[split] = SplitInfo(sum(s.rows for s in mine), [s.path for s in mine],
                               {c: int(n) for c, n in zip(classes, counts)})
    return out


def check_fractions(fractions: dict[str, float]) -> dict[str, float]:
    unknown = set(fractions) - {"train", "val", "test"}
    if unknown:
        raise TlrayError(f"--split: unknown split(s) {sorted(unknown)}; use train, val, test")
    if "train" not in fractions or any(v < 0 for v in fractions.values()):
        raise TlrayError(f"--split needs a positive train fraction and no negative ones, got "
                         f"{fractions}")
    total = sum(fractions.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise TlrayError(f"--split fractions must add up to 1, got {total:g} from {fractions}")
    return {k: float(v) for k, v in fractions.items() if v > 0}


def parse_fractions(text: str) -> dict[str, float]:
    """'0.6,0.2,0.2' -> train/val/test; 'train=0.9,val=0.1' also works."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if all("=" in p for p in parts):
            return {k.strip(): float(v) for k, v in (p.split("=", 1) for p in parts)}
        return dict(zip(("train", "val", "test"), (float(p) for p in parts)))
    except ValueError:
        raise TlrayError(f"--split expects fractions like 0.8,0.1,0.1, got {text!r}") from None


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """'128' or '128x96' (height x width) -> (128, 128) / (128, 96)."""
    if text in (None, ""):
        return None
    try:
        parts = [int(p) for p in str(text).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or any(p < 1 for p in parts):
        raise TlrayError(f"--image-size expects N or HxW (e.g. 128 or 128x128), got {text!r}")
    return (parts[0], parts[-1])


def _default_name(source: str) -> str:
    if source in (BUILTIN_MNIST, "builtin"):
        return "mnist-builtin"
    return Path(source.rstrip("/")).stem or "dataset"


def resolve_dataset(spec: str, *, progress: bool = True) -> DatasetInfo:
    """A prepared dataset directory as is; anything else is treated as a source and prepared
    (idempotently) under $TLRAY_HOME/datasets."""
    if "://" in spec or (Path(spec).expanduser() / "dataset.json").exists():
        info = load_info(spec)
        if info.features is not None:
            raise TlrayError(f"{spec} is a feature cache of {info.source['uri']}, not a dataset "
                             f"of images; train on that dataset (its cache is found by itself)")
        return info
    return prepare(spec, progress=progress)
