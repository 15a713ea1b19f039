"""Preparing a dataset: a validated source, split and written as Parquet shards + dataset.json.

dataset.json is written last, and the whole directory is built in a temporary sibling and
renamed into place, so a dataset directory is either complete or absent. The format itself
is described in `tlray.data.dataset`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from tlray import paths
from tlray.data.dataset import (
    FORMAT_VERSION,
    SPLITS,
    DatasetInfo,
    SplitInfo,
    encode_arrays,
    filesystem,
    join_uri,
    load_info,
    temporary_sibling,
)
from tlray.data.source_images import BUILTIN_MNIST, Skip, SourceImages
from tlray.data.sources import open_source
from tlray.errors import TlrayError

DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


MAX_SHARD_BYTES = 64 << 20


TARGET_SHARDS = 16  # per split, so that several workers each get several


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
        image_size, mode, classes, skip_corrupt: see `open_source`.
        rows_per_shard: rows per Parquet file; default aims at ~16 shards per split.
        force: rebuild even if an identical dataset exists.
        name: dataset name recorded in dataset.json (default: the destination's name).
        progress: show a bar while writing.
    """
    fractions = _check_fractions(fractions or dict(DEFAULT_FRACTIONS))
    if rows_per_shard is not None and rows_per_shard < 1:
        raise TlrayError(f"--rows-per-shard must be at least 1, got {rows_per_shard}")
    if dest is None:
        dest = default_path(name or _default_name(
            source.uri if isinstance(source, SourceImages) else source))
    dest = str(dest)
    name = name or Path(dest.rstrip("/")).name
    _recover_interrupted_swap(dest)

    src = source if isinstance(source, SourceImages) else open_source(
        source, image_size=image_size, mode=mode, classes=classes, skip_corrupt=skip_corrupt)
    options = {"seed": seed, "fractions": fractions, "image_size": image_size, "mode": mode,
               "classes": classes, "rows_per_shard": rows_per_shard,
               "skip_corrupt": skip_corrupt}
    fingerprint = hashlib.sha256(json.dumps(
        {"source": src.fingerprint, "options": options, "format": FORMAT_VERSION},
        sort_keys=True).encode()).hexdigest()

    fs, root = filesystem(dest)
    if fs.get_file_info(root).type != pafs.FileType.NotFound and not force:
        try:
            existing = load_info(dest)
        except TlrayError:
            existing = None
            if fs.get_file_info(join_uri(root, "dataset.json")).type == pafs.FileType.NotFound:
                if _non_empty(fs, root):
                    raise TlrayError(f"{dest!r} exists and is not a complete tlray dataset; "
                                     f"replace it with `tlray prepare SOURCE {dest} --force`"
                                     ) from None
        if existing is not None and existing.fingerprint == fingerprint:
            if progress:
                print(f"{dest}: up to date (same source and options), nothing to do")
            return existing

    splits = split_indices(src, fractions, seed)
    tmp = temporary_sibling(root, "tmp")
    fs.create_dir(tmp, recursive=True)
    try:
        written, skipped = _write_splits(fs, tmp, src, splits, rows_per_shard, seed, progress)
        skipped = src.skipped + skipped
        info = DatasetInfo(
            uri=dest, name=name, classes=src.class_names, height=src.height, width=src.width,
            channels=src.channels, mode=src.mode, splits=written,
            source={"kind": src.kind, "uri": src.uri, "fingerprint": src.fingerprint},
            options=options, fingerprint=fingerprint,
            skipped=[asdict(s) for s in skipped],
            ignored={"count": len(src.ignored), "examples": src.ignored[:20]}
            if src.ignored else {},
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        with fs.open_output_stream(join_uri(tmp, "dataset.json")) as f:
            f.write(json.dumps(info.to_json(), indent=2).encode())
        _swap_into_place(fs, tmp, root)
    except BaseException:
        fs.delete_dir(tmp) if fs.get_file_info(tmp).type != pafs.FileType.NotFound else None
        raise
    if skipped and progress:
        print(f"skipped {len(skipped)} unreadable item(s) (listed in dataset.json):",
              file=sys.stderr)
        for s in skipped[:20]:
            print(f"  {s.item}: {s.reason}", file=sys.stderr)
    return load_info(dest)


def split_indices(src: SourceImages, fractions: dict[str, float], seed: int
                  ) -> dict[str, np.ndarray]:
    """Stratified, seeded split; rows the source assigns itself keep their split.

    Within each class the rows are shuffled and cut at the cumulative fractions, so every
    split holds each class in (nearly) the same proportion. Train/val/test rows are
    shuffled; predict rows keep the source's order (a submission file depends on it).
    """
    rng = np.random.default_rng(seed)
    fixed = src.fixed_split if src.fixed_split is not None else np.full(len(src.labels), None)
    free = np.flatnonzero(np.array([f is None for f in fixed]))
    out: dict[str, list[np.ndarray]] = {}
    for split in set(f for f in fixed if f is not None):
        out[split] = [np.flatnonzero(fixed == split)]
    draw = {k: v for k, v in fractions.items() if k not in out}
    total = sum(draw.values())
    names = list(draw)
    cuts = np.cumsum([draw[n] / total for n in names])
    for label in np.unique(src.labels[free]):
        members = free[src.labels[free] == label]
        members = members[rng.permutation(len(members))]
        bounds = [0] + [int(round(c * len(members))) for c in cuts]
        for n, lo, hi in zip(names, bounds[:-1], bounds[1:]):
            out.setdefault(n, []).append(members[lo:hi])
    result = {}
    for split in SPLITS:
        if split not in out:
            continue
        idx = np.concatenate(out[split]) if out[split] else np.zeros(0, np.int64)
        result[split] = idx if split == "predict" else idx[rng.permutation(len(idx))]
    return {k: v for k, v in result.items() if len(v) or k in draw}


def _write_splits(fs, tmp: str, src: SourceImages, splits: dict[str, np.ndarray],
                  rows_per_shard: int | None, seed: int, progress: bool):
    row_bytes = src.height * src.width * src.channels
    schema = pa.schema([("image", pa.binary(row_bytes)), ("label", pa.int64()),
                        ("id", pa.string())])
    written: dict[str, SplitInfo] = {}
    skipped: list[Skip] = []
    bar = tqdm(total=sum(len(v) for v in splits.values()), unit="img", desc="prepare",
               disable=not progress, leave=False)
    for split, indices in splits.items():
        per_shard = rows_per_shard or max(1, min(math.ceil(len(indices) / TARGET_SHARDS),
                                                 MAX_SHARD_BYTES // row_bytes))
        fs.create_dir(join_uri(tmp, split), recursive=True)
        shards, counts, rows = [], np.zeros(len(src.class_names), np.int64), 0
        for start in range(0, max(len(indices), 1), per_shard):
            chunk = indices[start:start + per_shard]
            if not len(chunk):
                break
            images, chunk_skips = src.load(chunk)
            skipped.extend(chunk_skips)
            keep = _kept(chunk, src, chunk_skips)
            labels, ids = src.labels[keep], src.ids[keep]
            table = pa.Table.from_arrays(
                [encode_arrays(images), pa.array(labels, pa.int64()),
                 pa.array([str(i) for i in ids])], schema=schema)
            rel = f"{split}/part-{len(shards):05d}.parquet"
            pq.write_table(table, join_uri(tmp, rel), filesystem=fs, compression="zstd",
                           compression_level=1)
            shards.append(rel)
            labelled = labels[labels >= 0]
            counts += np.bincount(labelled, minlength=len(src.class_names))
            rows += len(labels)
            bar.update(len(chunk))
        written[split] = SplitInfo(rows, shards, {c: int(n) for c, n in
                                                  zip(src.class_names, counts)})
    bar.close()
    return written, skipped


def _kept(chunk: np.ndarray, src: SourceImages, skips: list[Skip]) -> np.ndarray:
    if not skips:
        return chunk
    gone = {s.item for s in skips}
    return np.array([i for i in chunk if src.ids[i] not in gone], dtype=np.int64)


def _check_fractions(fractions: dict[str, float]) -> dict[str, float]:
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


def _non_empty(fs, root: str) -> bool:
    return bool(fs.get_file_info(pafs.FileSelector(root, recursive=False)))


def _swap_into_place(fs, tmp: str, root: str) -> None:
    """Moves the finished dataset to `root`; an existing one is kept aside until then."""
    parent = root.rstrip("/").rpartition("/")[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    old = None
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        old = temporary_sibling(root, "old")
        fs.move(root, old)
    fs.move(tmp, root)
    if old is not None:
        fs.delete_dir(old)


def _recover_interrupted_swap(dest: str) -> None:
    """Restores a dataset set aside by a prepare that died between its two renames, and
    removes what interrupted prepares left in temporary siblings."""
    if "://" in dest:
        return
    root = Path(dest).expanduser().absolute()
    if not root.parent.exists():
        return
    for old in sorted(root.parent.glob(f".{root.name}.old-*")):
        if not root.exists() and (old / "dataset.json").is_file():
            old.rename(root)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.parent.glob(f".{root.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
