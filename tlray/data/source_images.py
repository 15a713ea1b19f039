"""What every raw source becomes: `SourceImages` (labels and provenance for every item up
front, pixels on demand) and the items it left out (`Skip`), and the names shared by the
readers of each kind of source (`tlray.data.arrays`, `tlray.data.folders`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

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
        ignored: hidden and system files (`.DS_Store`, `Thumbs.db`, dot-files, `__MACOSX/`).
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
    ignored: list[str] = field(default_factory=list)  # hidden and system files, not data

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


def resize_pixels(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    squeeze = arr.ndim == 3 and arr.shape[-1] == 1
    im = Image.fromarray(arr[..., 0] if squeeze else arr)
    out = np.asarray(im.resize((size[1], size[0]), Image.BICUBIC), dtype=np.uint8)
    return out[..., None] if squeeze or out.ndim == 2 else out

