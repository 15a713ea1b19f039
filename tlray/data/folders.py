"""Image folders (a directory, or a .zip of one): one sub-folder per class, every file checked
before anything is written, decoded lazily shard by shard when the dataset is written."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tlray.data.preprocess import to_mode
from tlray.data.source_images import (
    IGNORED_NAMES,
    IMAGE_EXTENSIONS,
    Skip,
    SourceImages,
    resize_pixels,
)
from tlray.errors import TlrayError


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


def image_folder(tree, uri: str, image_size, mode, classes, skip_corrupt) -> SourceImages:
    """One sub-folder per class; a single wrapping folder (e.g. `cell_images/`) is skipped.

    Every file is checked before anything is written: a strict prepare lists every problem
    in one error (see `FolderProblems`), with `skip_corrupt` undecodable and non-image files
    are left out and recorded instead. Hidden and system files are ignored (and counted).
    """
    listed = tree.files()
    files = [f for f in listed if not is_ignored(f[0])]
    ignored = [f[0] for f in listed if is_ignored(f[0])]
    prefix = class_root(files)
    by_class: dict[str, list[str]] = {}
    problems = FolderProblems(tree.name)
    for rel, _, _ in files:
        inner = rel[len(prefix):].split("/")
        if len(inner) < 2:
            problems.add(rel, "stray", "not inside a class folder (expected one sub-folder per "
                                       "class, e.g. Parasitized/ and Uninfected/)")
            continue
        by_class.setdefault(inner[0], []).append(rel)
    names = _class_names(tree, prefix, files, by_class, classes)
    items, labels = [], []
    for label, name in enumerate(names):
        for rel in by_class.get(name, []):
            if Path(rel).suffix.lower() not in IMAGE_EXTENSIONS:
                problems.add(rel, "non-image", f"not an image file (expected one of "
                                               f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
                continue
            items.append(rel)
            labels.append(label)
    scans = scan_images(tree, items)
    for rel, scan in zip(items, scans):
        if isinstance(scan, str):
            problems.add(rel, "unreadable", f"not a readable image ({scan})")
    keep = [i for i, scan in enumerate(scans) if not isinstance(scan, str)]
    items, labels = [items[i] for i in keep], [labels[i] for i in keep]
    headers = [scans[i] for i in keep]
    if image_size is None and headers:
        problems.off_size(items, [size for _, size in headers])
    skips = problems.raise_or_skip(skip_corrupt)
    out_mode = mode or ("L" if all(m in ("L", "1", "I;16", "I", "LA") for m, _ in headers)
                        else "RGB")
    width, height = headers[0][1] if image_size is None else image_size[::-1]
    return SourceImages(
        "image-folder" if isinstance(tree, DirTree) else "image-zip", uri,
        _fingerprint(files), names, np.array(labels, dtype=np.int64),
        np.array(items, dtype=object), None, out_mode, int(height), int(width),
        _folder_loader(tree, np.array(items, dtype=object), out_mode, (height, width),
                       skip_corrupt), skips, ignored)


def _class_names(tree, prefix: str, files, by_class: dict, classes) -> list[str]:
    """The class folders, in label order; structural problems are an error at once."""
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
    return names


def _folder_loader(tree, items: np.ndarray, mode: str, size: tuple[int, int],
                   skip_corrupt: bool):
    """`SourceImages.load` for an image folder: decodes the asked items, in parallel."""

    def load(indices: np.ndarray) -> tuple[np.ndarray, list[Skip]]:
        def decode(rel: str):
            try:
                return _decode(tree.read(rel), mode, size)
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                if not skip_corrupt:
                    raise TlrayError(f"{tree.name}: {rel}: cannot decode image ({e})") from None
                return Skip(rel, f"cannot decode image ({e})")

        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
            decoded = list(pool.map(decode, items[indices]))
        skipped = [d for d in decoded if isinstance(d, Skip)]
        good = [d for d in decoded if not isinstance(d, Skip)]
        arr = np.stack(good) if good else np.zeros((0, *size, 1 if mode == "L" else 3), np.uint8)
        return arr, skipped

    return load


class FolderProblems:
    """Every problem a folder scan finds, reported together: the first 20 by name, then the
    rest counted by kind, and what to do about each kind."""

    SHOWN = 20
    FIXES = {"unreadable": "--skip-corrupt leaves them out",
             "non-image": "--skip-corrupt leaves them out",
             "off-size": "--image-size HxW resizes every image",
             "stray": "move them into a class folder"}

    def __init__(self, where: str, fixes_from: str | None = "tlray prepare SOURCE"):
        self.where, self.fixes_from = where, fixes_from
        self.found: list[tuple[str, str, str]] = []  # (file, kind, what is wrong)

    def add(self, item: str, kind: str, reason: str) -> None:
        self.found.append((item, kind, reason))

    def off_size(self, items: list[str], sizes: list[tuple[int, int]]) -> None:
        """Images whose size differs from the most common one (with no --image-size)."""
        usual = Counter(sizes).most_common(1)[0][0]
        for item, size in zip(items, sizes):
            if size != usual:
                self.add(item, "off-size", f"{size[1]}x{size[0]} (HxW), where the others are "
                                           f"{usual[1]}x{usual[0]}")

    def raise_or_skip(self, skip_corrupt: bool) -> list[Skip]:
        """With `skip_corrupt`, what can be left out becomes skips; anything else is one
        error naming every problem."""
        skippable = {"unreadable", "non-image"} if skip_corrupt else set()
        fatal = [p for p in self.found if p[1] not in skippable]
        if fatal:
            raise TlrayError(self.message(fatal))
        return [Skip(item, reason) for item, _, reason in sorted(self.found)]

    def message(self, problems: list[tuple[str, str, str]]) -> str:
        problems = sorted(problems)
        lines = [f"{self.where}: {len(problems)} problem(s), nothing was written:"]
        lines += [f"  {item}: {reason}" for item, _, reason in problems[:self.SHOWN]]
        rest = Counter(kind for _, kind, _ in problems[self.SHOWN:])
        if rest:
            lines.append("  and " + ", ".join(f"{n} more {kind}" for kind, n in rest.items()))
        if self.fixes_from:
            kinds = dict.fromkeys(kind for _, kind, _ in problems)
            lines.append("fix: " + "; ".join(f"{kind}: {self.FIXES[kind]}" for kind in kinds)
                         + f" (options of `{self.fixes_from}`)")
        return "\n".join(lines)


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


def scan_images(tree, items: list[str]) -> list[tuple[str, tuple[int, int]] | str]:
    """Decodes every image once, in parallel: (mode, (width, height)) for each, or what is
    wrong with it (a truncated file fails here, not halfway through writing a dataset)."""

    def scan(rel: str):
        try:
            with Image.open(io.BytesIO(tree.read(rel))) as im:
                im.load()
                return im.mode, im.size
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            return str(e) or type(e).__name__

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(scan, items))


def _decode(data: bytes, mode: str, size: tuple[int, int]) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # raises on truncated files, which Image.open alone does not notice
        arr = to_mode(im, mode)
    if arr.shape[:2] != size:
        arr = resize_pixels(arr, size)
    return arr if arr.ndim == 3 else arr[..., None]
