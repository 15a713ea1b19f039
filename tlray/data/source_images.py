"""What every raw source becomes: `SourceImages` (labels and provenance for every item up
front, pixels on demand, part by part), what is wrong with its items (`SourceProblems`) and
the items it left out (`Skip`), and the names shared by the readers of each kind of source
(`tlray.data.pixel_sources`, `tlray.data.folders`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from tlray.errors import TlrayError

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


class SourcePart(Protocol):
    """Some items of a source, able to load their pixels wherever it is sent (it pickles:
    a Ray task gets the part, not the source)."""

    def load(self) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """(uint8 [N, H, W, C] pixels of the items that decoded, [(position in the part,
        what is wrong)] for those that did not)."""


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
        part: the `SourcePart` of the items at the given indices.
        problems: what is wrong with items, found so far (an image folder's files are only
            all checked once every part has been loaded).
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
    part: Callable[[np.ndarray], SourcePart] = field(repr=False)
    problems: SourceProblems = field(default_factory=lambda: SourceProblems(""))
    ignored: list[str] = field(default_factory=list)  # hidden and system files, not data

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    @property
    def decodes(self) -> bool:
        """Whether loading decodes image files (an image folder or zip), rather than
        slicing pixels already in memory."""
        return self.kind in ("image-folder", "image-zip")


class SourceProblems:
    """Every problem found in a source, reported together: the first 20 by name, then the
    rest counted by kind, and what to do about each kind. An item keeps its first problem."""

    SHOWN = 20
    FIXES = {"unreadable": "--skip-corrupt leaves them out",
             "non-image": "--skip-corrupt leaves them out",
             "off-size": "--image-size HxW resizes every image",
             "stray": "move them into a class folder"}
    SKIPPABLE = {"unreadable", "non-image"}

    def __init__(self, where: str, fixes_from: str | None = "tlray prepare SOURCE"):
        self.where, self.fixes_from = where, fixes_from
        self.found: dict[str, tuple[str, str]] = {}  # file -> (kind, what is wrong)

    def add(self, item: str, kind: str, reason: str) -> None:
        self.found.setdefault(item, (kind, reason))

    def off_size(self, items: np.ndarray, sizes: np.ndarray) -> None:
        """Images whose (width, height) differs from the most common one (with no
        --image-size); of equally common sizes, the first one met is the usual one."""
        values, first, counts = np.unique(sizes, axis=0, return_index=True, return_counts=True)
        usual = values[min(np.flatnonzero(counts == counts.max()), key=lambda k: first[k])]
        for i in np.flatnonzero((sizes != usual).any(axis=1)):
            (w, h), (uw, uh) = sizes[i], usual
            self.add(items[i], "off-size", f"{h}x{w} (HxW), where the others are {uh}x{uw}")

    def fatal(self, skip_corrupt: bool) -> list[tuple[str, str, str]]:
        """(file, kind, what is wrong) of the problems that stop a prepare, by file."""
        skippable = self.SKIPPABLE if skip_corrupt else set()
        return sorted((item, kind, reason) for item, (kind, reason) in self.found.items()
                      if kind not in skippable)

    def raise_or_skip(self, skip_corrupt: bool) -> list[Skip]:
        """With `skip_corrupt`, what can be left out becomes skips; anything else is one
        error naming every problem."""
        fatal = self.fatal(skip_corrupt)
        if fatal:
            raise TlrayError(self.message(fatal))
        return [Skip(item, reason) for item, (_, reason) in sorted(self.found.items())]

    def message(self, problems: list[tuple[str, str, str]]) -> str:
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
