"""Which rows of a source go to which split: stratified by label, seeded, and decided from the
labels alone (before any pixel is decoded, so it is the same wherever the shards are written)."""

from __future__ import annotations

import numpy as np

from tlray.data.dataset import SPLITS
from tlray.data.source_images import SourceImages

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
