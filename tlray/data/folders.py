"""Image folders (a directory or a .zip of one, on a disk or in an object store): one
sub-folder per class.

Opening one lists it (names, sizes: no pixels) and, unless `--image-size` and `--mode` are both
given, reads every image's header to learn its size and channel mode. Decoding happens later,
part by part (`FolderPart`), wherever the dataset's shards are written. Every problem found on
the way is recorded in the source's `SourceProblems`; `tlray prepare` reports them all at once.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tlray.data.pixels import resize_pixels, to_mode
from tlray.data.source_images import IMAGE_EXTENSIONS, SourceImages, SourceProblems
from tlray.data.trees import is_ignored
from tlray.errors import TlrayError

# What Pillow raises for a file that is not an image, or not a whole one.
DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError,
                 Image.DecompressionBombError)
GREY_MODES = ("L", "1", "I;16", "I", "LA")
HEADERS_PER_JOB = 2000  # headers read per task: a few hundred ms of work each


def image_folder(tree, uri: str, image_size, mode, classes, executor=None) -> SourceImages:
    """One sub-folder per class; a single wrapping folder (e.g. `cell_images/`) is skipped.

    Stray files (outside a class folder), non-image files, unreadable headers and, without
    `image_size`, images of another size are recorded as problems; an empty class folder or
    a class outside `classes` is an error at once. Hidden and system files are ignored (and
    counted).
    """
    listing = tree.listing()
    prefix = class_root(listing.files)
    problems = SourceProblems(tree.name)
    by_class: dict[str, list[str]] = {}
    for rel in listing.files:
        inner = rel[len(prefix):].split("/")
        if len(inner) < 2:
            problems.add(rel, "stray", "not inside a class folder (expected one sub-folder per "
                                       "class, e.g. Parasitized/ and Uninfected/)")
            continue
        by_class.setdefault(inner[0], []).append(rel)
    names = _class_names(tree.name, prefix, listing.folders, by_class, classes)
    items, labels = [], []
    for label, name in enumerate(names):
        for rel in by_class.get(name, []):
            if Path(rel).suffix.lower() not in IMAGE_EXTENSIONS:
                problems.add(rel, "non-image", f"not an image file (expected one of "
                                               f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
                continue
            items.append(rel)
            labels.append(label)
    items = np.array(items, dtype=object)
    if image_size is None or mode is None:
        mode, image_size = _modes_and_sizes(tree, items, problems, image_size, mode, executor)
    height, width = image_size
    return SourceImages(
        tree.kind, uri, listing.fingerprint, names, np.array(labels, dtype=np.int64), items,
        None, mode, int(height), int(width),
        lambda indices: FolderPart(tree, items[indices], mode, (int(height), int(width))),
        problems, listing.ignored)


def _class_names(where: str, prefix: str, folders: list[str], by_class: dict,
                 classes) -> list[str]:
    """The class folders, in label order; structural problems are an error at once."""
    class_dirs = sorted(d[len(prefix):] for d in folders if d.startswith(prefix)
                        and d[len(prefix):] and "/" not in d[len(prefix):]
                        and not is_ignored(d[len(prefix):]))
    empty = sorted(set(class_dirs) - set(by_class))
    if empty:
        raise TlrayError(f"{where}: class folder {prefix + empty[0]!r} contains no images")
    if not by_class:
        raise TlrayError(f"{where}: no class folders with images found")
    names = sorted(by_class)
    if classes is not None:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise TlrayError(f"{where}: class folder {unknown[0]!r} is not in the class list "
                             f"{classes}")
        names = list(classes)
    return names


def _modes_and_sizes(tree, items: np.ndarray, problems: SourceProblems, image_size, mode,
                     executor) -> tuple[str, tuple[int, int]]:
    """The dataset's channel mode and (height, width), from every image's header (read on
    `executor`): grey only if every image is, and the images' size, which must then be the
    same for all of them."""
    from tlray.data.executors import InProcess

    jobs = [(tree, items[start:start + HEADERS_PER_JOB])
            for start in range(0, len(items), HEADERS_PER_JOB)]
    grey = np.zeros(len(items), bool)
    sizes = np.zeros((len(items), 2), np.int64)  # (width, height), as Pillow says
    readable = np.ones(len(items), bool)
    for job, (job_grey, job_sizes, failures) in (executor or InProcess()).map(
            read_headers, jobs, images=len(items), what="read image headers"):
        start = job * HEADERS_PER_JOB
        grey[start:start + len(job_grey)] = job_grey
        sizes[start:start + len(job_sizes)] = job_sizes
        for position, reason in failures:
            readable[start + position] = False
            problems.add(items[start + position], "unreadable", reason)
    if not readable.any():
        raise TlrayError(problems.message(problems.fatal(skip_corrupt=False)))
    if image_size is None:
        problems.off_size(items[readable], sizes[readable])
        image_size = tuple(int(s) for s in sizes[readable][0][::-1])
    return mode or ("L" if grey[readable].all() else "RGB"), image_size


def read_headers(tree, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
    """Each image's channel mode (grey or not) and (width, height) from its header, which is
    all that is read; [(position, what is wrong)] for files that are not images. A truncated
    file still passes here: decoding it (`FolderPart.load`) finds out."""

    def header(rel: str):
        try:
            with tree.open(rel) as f, Image.open(f) as im:
                return im.mode in GREY_MODES, im.size
        except DECODE_ERRORS as e:
            return f"not a readable image ({e or type(e).__name__})"

    with ThreadPoolExecutor(max_workers=8) as pool:
        found = list(pool.map(header, items))
    failures = [(i, h) for i, h in enumerate(found) if isinstance(h, str)]
    found = [(False, (0, 0)) if isinstance(h, str) else h for h in found]
    return (np.array([g for g, _ in found], bool),
            np.array([s for _, s in found], np.int64).reshape(-1, 2), failures)


@dataclass
class FolderPart:
    """Images of a folder, to be decoded wherever this part is sent (it pickles)."""

    tree: object
    items: np.ndarray  # paths in the tree
    mode: str
    size: tuple[int, int]  # (height, width)

    def load(self) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """Decodes the items (in parallel threads: Pillow releases the GIL while it works)."""
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
            decoded = list(pool.map(self._decode, self.items))
        failures = [(i, d) for i, d in enumerate(decoded) if isinstance(d, str)]
        good = [d for d in decoded if not isinstance(d, str)]
        channels = 1 if self.mode == "L" else 3
        return (np.stack(good) if good else np.zeros((0, *self.size, channels), np.uint8),
                failures)

    def _decode(self, rel: str) -> np.ndarray | str:
        try:
            with Image.open(io.BytesIO(self.tree.read(rel))) as im:
                im.load()  # raises on truncated files, which Image.open alone does not notice
                arr = to_mode(im, self.mode)
        except DECODE_ERRORS as e:
            return f"not a readable image ({e or type(e).__name__})"
        if arr.shape[:2] != self.size:
            arr = resize_pixels(arr, self.size)
        return arr if arr.ndim == 3 else arr[..., None]


def class_root(files: list[str]) -> str:
    """Descends through single wrapping folders (`cell_images/cell_images/...`)."""
    prefix = ""
    while True:
        tops = {f[len(prefix):].split("/")[0] for f in files}
        deeper = all("/" in f[len(prefix):] for f in files)
        if len(tops) == 1 and deeper and files:
            candidate = prefix + tops.pop() + "/"
            # Stop when the next level down holds files directly: those are the classes.
            if all(f[len(candidate):].count("/") >= 1 for f in files):
                prefix = candidate
                continue
        return prefix
