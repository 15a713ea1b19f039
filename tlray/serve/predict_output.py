"""Where `tlray predict`'s answers go, written as they stream in: a CSV (Kaggle's submission
`ImageId,Label`, or `id,class[,label],prob_<class>...`) or, for an `--out` ending in `.parquet`,
a folder of Parquet shards with the same columns.

The output is built in a temporary sibling and moved into place once every row has an answer
(`tlray.data.atomic`): it is complete or absent, and an existing file is only replaced by a
complete new one. A row the model could not take (an unreadable image) stops the output from
being written at all, and the error names every such row.
"""

from __future__ import annotations

import io
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tlray.data import atomic
from tlray.data.dataset import filesystem, join_uri
from tlray.data.source_images import SourceProblems
from tlray.errors import TlrayError
from tlray.serve.predict_inputs import Inputs
from tlray.serve.predict_scoring import ERROR_COLUMN
from tlray.serve.columns import probability_columns

FORMATS = ("auto", "kaggle", "probs")
KAGGLE_COLUMNS = ("ImageId", "Label")
DEFAULT_OUT = {"kaggle": "submission.csv", "probs": "predictions.csv"}
PARQUET_SUFFIX = ".parquet"
ROWS_PER_PARQUET_SHARD = 1_000_000
_SUMMARY_CLASSES = 10  # class counts shown in the summary line
_ROW_NUMBER = re.compile(r".*:row (\d+)$")


def check_out(out: str | os.PathLike) -> str:
    """The output path (or URI), checked before any work: a CSV is not a folder, and a local
    destination's folder is writable."""
    text = str(out)
    if "://" in text:
        return text
    path = Path(out).expanduser().absolute()
    if path.is_dir() and not text.endswith(PARQUET_SUFFIX):
        raise TlrayError(f"--out {text!r} is a directory; expected a CSV file path (or a "
                         f"folder name ending in {PARQUET_SUFFIX} for Parquet shards)")
    parent = path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise TlrayError(f"--out {text!r}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK):
        raise TlrayError(f"--out {text!r}: folder {existing} is not writable")
    return str(path)


class Answers:
    """The output being written, and the tally its summary line is made of."""

    def __init__(self, path: str, fmt: str, inputs: Inputs, class_names: list[str], *,
                 keep: bool = True):
        self.path, self.fmt, self.inputs, self.class_names = path, fmt, inputs, class_names
        self.parquet = path.rstrip("/").endswith(PARQUET_SUFFIX)
        self.fs, self.root = filesystem(path)
        atomic.remove_leftovers(path)
        self.tmp = atomic.begin(self.fs, self.root, folder=self.parquet)
        self.file = self.shard = None
        self.shards, self.shard_rows = 0, 0
        self.problems = SourceProblems(inputs.description, fixes_from=None)
        self.rows = self.labelled = self.correct = 0
        self.counts: Counter = Counter()
        self.kept: list[pd.DataFrame] | None = [] if keep else None

    def add(self, answers: pa.Table) -> None:
        """Writes the rows that have an answer; remembers the others' reasons."""
        failed = answers.filter(answers.column(ERROR_COLUMN).is_valid())
        for item, reason in zip(failed.column("id").to_pylist(),
                                failed.column(ERROR_COLUMN).to_pylist()):
            self.problems.add(item, "unreadable", reason)
        good = answers.filter(answers.column(ERROR_COLUMN).is_null())
        predicted = good.column("class").to_pylist()
        labels = good.column("label").to_pylist()
        self.counts.update(predicted)
        known = [(p, lab) for p, lab in zip(predicted, labels) if lab is not None]
        self.labelled += len(known)
        self.correct += sum(p == lab for p, lab in known)
        frame = self._frame(good, predicted, labels)
        self.rows += len(frame)
        self._write(frame)
        if self.kept is not None:
            self.kept.append(frame)

    def _frame(self, good: pa.Table, predicted: list[str], labels: list) -> pd.DataFrame:
        """Kaggle's `ImageId,Label`, or `id,class[,label],prob_<class>...` (label: the true
        class where the source knows it; empty elsewhere)."""
        ids = good.column("id").to_pylist()
        if self.fmt == "kaggle":
            numbers = [_ROW_NUMBER.fullmatch(i) for i in ids] if self.inputs.row_numbers else []
            image_ids = (np.array([int(m.group(1)) for m in numbers], np.int64)
                         if numbers and all(numbers)
                         else np.arange(self.rows + 1, self.rows + len(ids) + 1))
            return pd.DataFrame({KAGGLE_COLUMNS[0]: image_ids, KAGGLE_COLUMNS[1]: predicted})
        columns = {"id": ids, "class": predicted}
        if self.inputs.labelled:
            columns["label"] = ["" if lab is None else lab for lab in labels]
        for name in probability_columns(self.class_names):
            columns[name] = good.column(name).to_numpy()
        return pd.DataFrame(columns)

    def _write(self, frame: pd.DataFrame) -> None:
        if self.parquet:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self.shard is None or self.shard_rows >= ROWS_PER_PARQUET_SHARD:
                self._close_shard()
                path = join_uri(self.tmp, f"part-{self.shards:05d}.parquet")
                self.shard = pq.ParquetWriter(path, table.schema, filesystem=self.fs)
                self.shards, self.shard_rows = self.shards + 1, 0
            self.shard.write_table(table)
            self.shard_rows += len(frame)
            return
        if self.file is None:
            self.file = _CsvFile(self.fs, self.tmp)
            self.file.write(frame, header=True)
        elif len(frame):
            self.file.write(frame, header=False)

    def _close_shard(self) -> None:
        if self.shard is not None:
            self.shard.close()
            self.shard = None

    def commit(self) -> None:
        """Moves the output into place, unless some row had no answer (then nothing is)."""
        fatal = self.problems.fatal(skip_corrupt=False)
        if fatal:
            raise TlrayError(self.problems.message(fatal))
        if self.file is None and not self.parquet:  # no rows at all: still a header
            self._write(self._frame(_empty(self.class_names), [], []))
        self._close_shard()
        if self.file is not None:
            self.file.close()
        atomic.commit(self.fs, self.tmp, self.root)

    def abort(self) -> None:
        """Removes what was written so far."""
        try:
            self._close_shard()
            if self.file is not None:
                self.file.close()
        finally:
            atomic.discard(self.fs, self.tmp)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def table(self) -> pd.DataFrame:
        """Every row written (with `keep`), as one DataFrame."""
        return pd.concat(self.kept, ignore_index=True) if self.kept else pd.DataFrame()

    def summary(self, model: str) -> str:
        """One line: what was predicted with what, where it went, the classes and accuracy."""
        shown = (self.class_names if len(self.class_names) <= _SUMMARY_CLASSES else
                 [c for c, _ in self.counts.most_common(_SUMMARY_CLASSES)])
        dist = ", ".join(f"{c}: {self.counts.get(c, 0)}" for c in shown)
        if len(self.class_names) > len(shown):
            dist += f", ... ({len(self.class_names) - len(shown)} more classes)"
        where = self.path
        if "://" not in where:
            relative = os.path.relpath(where)
            where = where if relative.startswith("..") else relative
        kind = ("Kaggle submission ImageId,Label" if self.fmt == "kaggle"
                else "class probabilities")
        line = (f"predicted {self.rows} rows of {self.inputs.description} with {model}: wrote "
                f"{where} ({kind}{', Parquet shards' if self.parquet else ''}); predicted "
                f"classes {dist}")
        if self.accuracy is not None:
            line += f"; accuracy {self.accuracy:.4f} on {self.labelled} labelled rows"
        return line


def _empty(class_names: list[str]) -> pa.Table:
    return pa.table({"id": pa.array([], pa.string()), "label": pa.array([], pa.string()),
                     "class": pa.array([], pa.string()),
                     **{c: pa.array([], pa.float64()) for c in probability_columns(class_names)}})


class _CsvFile:
    """A CSV written frame by frame; on a local disk it is flushed to disk before it is
    moved into place."""

    def __init__(self, fs, path: str):
        self.local = "://" not in path and type(fs).__name__ == "LocalFileSystem"
        self.raw = open(path, "x", newline="") if self.local else io.TextIOWrapper(
            fs.open_output_stream(path), newline="")

    def write(self, frame: pd.DataFrame, header: bool) -> None:
        frame.to_csv(self.raw, index=False, header=header, float_format="%.6g")
        self.raw.flush()  # what is answered shows (`tail -f`); a few rows cost nothing more

    def close(self) -> None:
        if self.raw.closed:
            return
        self.raw.flush()
        if self.local:
            os.fsync(self.raw.fileno())
        self.raw.close()


def write_csv_atomic(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Writes `frame` (no index) to `path` through a temporary sibling and a rename.

    A crash or error while writing leaves `path` as it was (absent, or the previous
    complete file) and removes the temporary file.
    """
    fs, root = filesystem(str(path))
    tmp = atomic.begin(fs, root, folder=False)
    try:
        out = _CsvFile(fs, tmp)
        try:
            out.write(frame, header=True)
        finally:
            out.close()
        atomic.commit(fs, tmp, root)
    except BaseException:
        atomic.discard(fs, tmp)
        raise
    return Path(root)
