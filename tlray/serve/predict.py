"""Predictions from a logged tlray model on new images: `tlray predict`.

A thin client of the model itself: the model's pyfunc (`tlray.serve.pyfunc.ImageClassifier`)
converts channels, resizes and normalises exactly as training did, so this module only
finds the images, hands them over as they are (pixels, or the files' bytes) and writes the
answers. A model is anything MLflow resolves (`models:/NAME@champion`, `models:/NAME/VERSION`,
`models:/m-ID`, `runs:/RUN_ID/model`, a local model directory); a bare registered name means
`models:/NAME@champion`.

Sources:
  - a prepared dataset directory (split `predict` if it has one, else `test`),
  - a pixel CSV: Kaggle's `test.csv` (pixel columns only), or a `train.csv`-style one with a
    `label` column (its labels are kept for the accuracy); a Kaggle competition directory
    holding `test.csv` means that file,
  - images: a folder (flat, or one sub-folder per class; a sub-folder named like one of the
    model's classes is taken as the true label), a `.zip` of one, or a single image file.

Output: Kaggle's `submission.csv` (`ImageId,Label`, ImageId 1-based in the source's row
order, Label the class name) for Kaggle-style inputs, else `id,class[,label],prob_<class>...`.
The file is written to a temporary sibling and renamed, so it is either complete or absent
(an existing file is only replaced by a complete new one).
"""

from __future__ import annotations

import csv
import os
import re
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from tlray.errors import TlrayError

FORMATS = ("auto", "kaggle", "probs")
KAGGLE_COLUMNS = ("ImageId", "Label")
DEFAULT_OUT = {"kaggle": "submission.csv", "probs": "predictions.csv"}
MODEL_URI_HELP = ("models:/NAME@ALIAS (e.g. models:/NAME@champion), models:/NAME/VERSION, "
                  "models:/m-ID, runs:/RUN_ID/model, a local model directory, or a bare "
                  "registered model NAME (= models:/NAME@champion)")
_SUMMARY_CLASSES = 10  # class counts shown in the summary line


# --------------------------------------------------------------------------- public API


def predict(
    model_uri: str,
    source: str | os.PathLike,
    *,
    split: str | None = None,
    out: str | os.PathLike | None = None,
    batch_size: int = 256,
    format: str = "auto",  # noqa: A002 (the CLI option's name)
    verbose: bool = True,
) -> pd.DataFrame:
    """Predicts every image of `source` with a logged tlray model and writes a CSV.

    Every input problem (unknown model, alias or version, a model that does not take raw
    images, a missing or malformed source, an unwritable output path) is a `TlrayError`
    raised before the model is loaded or any image is predicted.

    Args:
        model_uri: see the module docstring.
        source: a prepared dataset directory, a pixel CSV (or a directory holding Kaggle's
            test.csv), an image folder, a .zip of one, or one image file.
        split: the prepared dataset's split to predict (default `predict` if it has one,
            else `test`). Only for prepared datasets.
        out: the CSV to write (default `./submission.csv` for the Kaggle format,
            `./predictions.csv` otherwise). Parent folders are created.
        batch_size: images per forward pass.
        format: "kaggle" (`ImageId,Label`), "probs" (`id,class[,label],prob_<class>...`), or
            "auto": kaggle for a test.csv or a Kaggle dataset's predict split, else probs.
        verbose: show a progress bar and print a one-line summary.

    Returns:
        The table written to `out`; `.attrs` holds "path" (the file written), "summary"
        (the summary line), "model_uri" (the exact logged model used) and "accuracy" (or
        None when no row had a known label).
    """
    if format not in FORMATS:
        raise TlrayError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise TlrayError(f"--batch-size must be a positive integer, got {batch_size!r}")
    source = str(source)
    if "://" not in source and not Path(source).expanduser().exists():
        raise TlrayError(f"source {source!r} does not exist (expected a prepared dataset "
                         f"directory, a pixel CSV such as Kaggle's test.csv, an image folder or "
                         f".zip, or an image file)")

    model_uri = _normalise_uri(model_uri)
    info = _model_info(model_uri)
    class_names = _check_image_model(info, model_uri)

    inputs = _open_inputs(source, split, class_names)
    fmt = format if format != "auto" else ("kaggle" if inputs.kaggle else "probs")
    path = _check_out(out if out is not None else Path.cwd() / DEFAULT_OUT[fmt])

    model = _load_model(info.model_uri or model_uri, model_uri)
    predicted, probs, ids, labels = _run(model, inputs, class_names, batch_size, verbose)

    frame = _table(fmt, inputs, ids, labels, probs, predicted, class_names)
    write_csv_atomic(frame, path)

    known = [(p, lab) for p, lab in zip(predicted, labels) if lab is not None]
    accuracy = sum(p == lab for p, lab in known) / len(known) if known else None
    summary = _summary(len(frame), inputs.description, _describe_model(model_uri), path, fmt,
                       predicted, class_names, accuracy, len(known))
    frame.attrs.update(path=str(path), summary=summary, model_uri=info.model_uri or model_uri,
                       accuracy=accuracy)
    if verbose:
        print(summary)
    return frame


def write_csv_atomic(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Writes `frame` (no index) to `path` through a temporary sibling and a rename.

    A crash or error while writing leaves `path` as it was (absent, or the previous
    complete file) and removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "x", newline="") as f:
            frame.to_csv(f, index=False, float_format="%.6g")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- the model


def _normalise_uri(model_uri: str) -> str:
    """A bare registered model name means its champion; URIs and paths pass unchanged."""
    model_uri = str(model_uri).strip()
    if not model_uri:
        raise TlrayError(f"model URI is empty: expected {MODEL_URI_HELP}")
    if (":" not in model_uri and "/" not in model_uri and os.sep not in model_uri
            and not Path(model_uri).exists()):
        from tlray.track.registry import CHAMPION_ALIAS

        return f"models:/{model_uri}@{CHAMPION_ALIAS}"
    return model_uri


def _model_info(model_uri: str):
    """mlflow's ModelInfo for `model_uri`, or a TlrayError that says what exists instead."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tlray.track import runs as tracking

    tracking.configure()
    try:
        return mlflow.models.get_model_info(model_uri)
    except (MlflowException, OSError) as e:
        raise TlrayError(_explain_missing_model(model_uri, e)) from None


def _parse_models_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS -> (NAME, "alias", ALIAS); models:/NAME/V -> (NAME, "version", V);
    models:/m-ID -> (m-ID, "logged", None)."""
    rest = model_uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, "alias", alias
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return name, "version", version
    return rest, ("logged" if rest.startswith("m-") else None), None


def _explain_missing_model(model_uri: str, error: Exception) -> str:
    """Names the URI and what the store does hold: aliases, versions, models, runs."""
    from mlflow import MlflowClient

    from tlray.track import runs as tracking

    store = f"tracking store {tracking.tracking_uri()}"
    client = MlflowClient()
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    try:
        if model_uri.startswith("models:/"):
            name, kind, ref = _parse_models_uri(model_uri)
            if kind == "logged":
                return (f"model {model_uri}: no logged model with id {name!r} in the {store} "
                        f"({reason})")
            registered = _registered_model(client, name)
            if registered is None:
                names = [m.name for m in client.search_registered_models(max_results=20)]
                have = (f"registered models there: {', '.join(sorted(names))}" if names
                        else "it has no registered models")
                return (f"model {model_uri}: there is no registered model named {name!r} in the "
                        f"{store} ({have}); check MLFLOW_TRACKING_URI / TLRAY_HOME")
            versions = sorted((int(v.version) for v in
                               client.search_model_versions(f"name = '{_quote(name)}'")))
            aliases = ", ".join(f"@{a} -> version {v}" for a, v in
                                sorted(registered.aliases.items())) or "none"
            listing = (f"its aliases: {aliases}; its versions: "
                       f"{', '.join(map(str, versions)) or 'none'}")
            if kind == "alias":
                return f"model {model_uri}: registered model {name!r} has no alias {ref!r} ({listing})"
            if kind == "version":
                return (f"model {model_uri}: registered model {name!r} has no version {ref!r} "
                        f"({listing})")
            return (f"model {model_uri}: expected models:/{name}@ALIAS or "
                    f"models:/{name}/VERSION ({listing})")
        if model_uri.startswith("runs:/"):
            run_id, _, artifact = model_uri[len("runs:/"):].strip("/").partition("/")
            try:
                run = client.get_run(run_id)
            except Exception:
                return f"model {model_uri}: run {run_id!r} does not exist in the {store}"
            names = _run_model_names(run)
            have = (f"its logged models: {', '.join(names)}" if names
                    else "it has no logged models")
            return (f"model {model_uri}: run {run_id} has no model at {artifact or '(empty)'!r} "
                    f"({have}; use runs:/{run_id}/<model name>)")
    except Exception as lookup_error:  # explaining must never hide the original problem
        return f"model {model_uri}: {reason} (and looking up what exists failed: {lookup_error})"
    return (f"model {model_uri}: no MLflow model there ({reason}); expected {MODEL_URI_HELP} "
            f"(using the {store})")


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        return None


def _run_model_names(run) -> list[str]:
    import mlflow

    try:
        models = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list")
        return sorted({m.name for m in models})
    except Exception:
        return []


def _describe_model(model_uri: str) -> str:
    """The URI, plus the version an alias points to (the alias may move later)."""
    if not model_uri.startswith("models:/"):
        return model_uri
    name, kind, ref = _parse_models_uri(model_uri)
    if kind != "alias":
        return model_uri
    try:
        from mlflow import MlflowClient

        return f"{model_uri} (version {MlflowClient().get_model_version_by_alias(name, ref).version})"
    except Exception:
        return model_uri


def _check_image_model(info, model_uri: str) -> list[str]:
    """The class names of a model that takes raw images (one tlray logged), or an error that
    says what the model is instead."""
    metadata = info.metadata or {}
    names = metadata.get("class_names")
    loader = ((info.flavors or {}).get("python_function") or {}).get("loader_module")
    if not isinstance(names, list) or not names or loader != "mlflow.pyfunc.loaders.code_model":
        raise TlrayError(
            f"model {model_uri} is not a tlray image classifier (flavors: "
            f"{', '.join(info.flavors or {}) or 'none'}; "
            f"{'no class_names metadata' if not names else 'its pyfunc takes tensors'}): "
            f"tlray predicts with models that take raw images, as tlray's training logs "
            f"them; a model logged by an older tlray needs retraining (or "
            f"`tlray train --model.weights={model_uri}` to start from it)")
    return [str(n) for n in names]


def _load_model(resolved_uri: str, model_uri: str):
    import mlflow.pyfunc

    try:
        return mlflow.pyfunc.load_model(resolved_uri)
    except Exception as e:
        raise TlrayError(f"model {model_uri} exists but could not be loaded ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None


# --------------------------------------------------------------------------- sources

@dataclass
class _Inputs:
    """What to predict: batches of (images, ids, true class name or None per row).

    A batch's images are what the model takes: one uint8 [N, H, W, C] array of pixels, or
    the bytes of N image files (any format, size and channel mode).
    """

    description: str
    rows: int
    kaggle: bool
    batches: Callable[[int], Iterator[tuple[Any, list[str], list[str | None]]]]
    image_ids: Callable[[list[str]], np.ndarray] | None = None


def _open_inputs(source: str, split: str | None, class_names: list[str]) -> _Inputs:
    from tlray.data import dataset as datasets
    from tlray.data import folders, source_images

    path = Path(source).expanduser()
    is_dataset = "://" in source or (path / "dataset.json").is_file() or _looks_like_dataset(path)
    if split is not None and not is_dataset:
        raise TlrayError(f"--split {split!r} applies to prepared datasets only, but {source!r} "
                         f"is not one (no dataset.json)")
    if is_dataset:
        return _dataset_inputs(datasets.load_info(source), split)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _csv_inputs(path)
    if path.is_dir() and (path / "test.csv").is_file():
        return _csv_inputs(path / "test.csv")
    if path.is_file() and path.suffix.lower() == ".zip":
        return _image_inputs(folders.ZipTree(path), source, class_names)
    if path.is_file() and path.suffix.lower() in source_images.IMAGE_EXTENSIONS:
        return _image_inputs(_SingleFile(path), source, class_names)
    if path.is_file():
        raise TlrayError(f"source {source!r} is a file but not a .csv, a .zip or an image "
                         f"({', '.join(sorted(source_images.IMAGE_EXTENSIONS))})")
    return _image_inputs(folders.DirTree(path), source, class_names)


def _looks_like_dataset(path: Path) -> bool:
    """Split folders of Parquet shards without dataset.json: an interrupted prepare, which
    `load_info` explains (rather than calling it an empty image folder)."""
    from tlray.data.dataset import SPLITS

    return path.is_dir() and any(any((path / s).glob("*.parquet")) for s in SPLITS)


def _csv_inputs(path: Path) -> _Inputs:
    """A pixel CSV through the same reader (and validation) as `tlray prepare`."""
    from tlray.data import arrays

    with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    labelled = bool(header) and header[0] == "label"
    images, raw = arrays.read_pixel_csv(path, labelled=labelled)
    ids = [f"{path.name}:row {i + 1}" for i in range(len(images))]
    labels = [str(int(v)) for v in raw] if labelled else [None] * len(images)

    def batches(batch_size: int):
        for start in range(0, len(images), batch_size):
            stop = start + batch_size
            yield images[start:stop], ids[start:stop], labels[start:stop]

    side = images.shape[1]
    return _Inputs(f"{path} ({len(images)} rows of {side}x{side} grey pixels"
                   f"{', labelled' if labelled else ''})", len(images), not labelled, batches)


def _dataset_inputs(info, split: str | None) -> _Inputs:
    from tlray.data.dataset import iter_split

    if split is None:
        split = next((s for s in ("predict", "test") if s in info.splits), None)
        if split is None:
            raise TlrayError(f"dataset {info.uri} has neither a predict nor a test split (it has "
                             f"{', '.join(info.splits)}); choose one with --split")
    info.shard_uris(split)  # explains an unknown split
    if info.splits[split].rows == 0:
        raise TlrayError(f"dataset {info.uri}: split {split!r} has no rows")

    def batches(batch_size: int):
        for images, label_ids, ids in iter_split(info, split):
            labels = [info.classes[i] if i >= 0 else None for i in label_ids]
            for start in range(0, len(ids), batch_size):
                stop = start + batch_size
                yield images[start:stop], ids[start:stop], labels[start:stop]

    kaggle = info.source.get("kind") == "kaggle-csv" and split == "predict"
    return _Inputs(f"dataset {info.uri}, split {split}", info.splits[split].rows, kaggle,
                   batches, _kaggle_row_numbers if kaggle else None)


def _kaggle_row_numbers(ids: list[str]) -> np.ndarray:
    """ImageId from the provenance ids ("test.csv:row 17" -> 17); 1..N if any id is not one."""
    numbers = [re.fullmatch(r".*:row (\d+)", i) for i in ids]
    if all(numbers):
        return np.array([int(m.group(1)) for m in numbers], dtype=np.int64)
    return np.arange(1, len(ids) + 1)


class _SingleFile:
    """One image file, with the interface of folders.DirTree."""

    def __init__(self, path: Path):
        self.path, self.name = path, str(path)

    def files(self) -> list[tuple[str, int, int]]:
        return [(self.path.name, 0, 0)]

    def read(self, rel: str) -> bytes:
        return self.path.read_bytes()


def _image_inputs(tree, source: str, class_names: list[str]) -> _Inputs:
    """Image files anywhere under the folder, in sorted path order; other files are ignored.
    The model gets each file's bytes and decodes them itself."""
    from tlray.data import folders, source_images

    files = [f for f in tree.files() if not folders.is_ignored(f[0])]
    items = [rel for rel, _, _ in files if Path(rel).suffix.lower() in source_images.IMAGE_EXTENSIONS]
    if not items:
        raise TlrayError(f"{tree.name}: no images found (expected files ending in "
                         f"{', '.join(sorted(source_images.IMAGE_EXTENSIONS))}, directly or in "
                         f"sub-folders; {len(files)} other file(s) there)")
    # Every image is read up front, so an unreadable file fails before any prediction.
    problems = folders.FolderProblems(tree.name, fixes_from=None)
    for rel, scan in zip(items, folders.scan_images(tree, items)):
        if isinstance(scan, str):
            problems.add(rel, "unreadable", f"not a readable image ({scan})")
    problems.raise_or_skip(skip_corrupt=False)
    wanted = set(items)
    prefix = folders.class_root([f for f in files if f[0] in wanted])
    known = set(class_names)
    labels: list[str | None] = []
    for rel in items:
        parts = rel[len(prefix):].split("/")
        labels.append(parts[0] if len(parts) >= 2 and parts[0] in known else None)

    def batches(batch_size: int):
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                yield list(pool.map(tree.read, chunk)), chunk, labels[start:start + batch_size]

    labelled = sum(lab is not None for lab in labels)
    return _Inputs(f"{source} ({len(items)} images"
                   f"{f', {labelled} in class folders' if labelled else ''})",
                   len(items), False, batches)


# --------------------------------------------------------------------------- predicting


def _run(model, inputs: _Inputs, class_names: list[str], batch_size: int, verbose: bool
         ) -> tuple[list[str], np.ndarray, list[str], list[str | None]]:
    """(predicted class names, probabilities [N, classes], ids, true labels) from the model."""
    from tqdm.auto import tqdm

    from tlray.serve.pyfunc import LABEL_COLUMN, probability_columns

    columns = probability_columns(class_names)
    predicted: list[str] = []
    probs: list[np.ndarray] = []
    ids: list[str] = []
    labels: list[str | None] = []
    with tqdm(total=inputs.rows, unit="img", desc="predict", disable=not verbose,
              leave=False) as bar:
        for images, batch_ids, batch_labels in inputs.batches(batch_size):
            if isinstance(images, list):  # file bytes: one object per image
                files = np.empty(len(images), dtype=object)
                files[:] = images
                images = files
            answer = model.predict(images)
            predicted += answer[LABEL_COLUMN].astype(str).tolist()
            probs.append(answer[columns].to_numpy(np.float64))
            ids.extend(batch_ids)
            labels.extend(batch_labels)
            bar.update(len(batch_ids))
    return (predicted, np.concatenate(probs) if probs else np.zeros((0, len(columns))), ids,
            labels)


# --------------------------------------------------------------------------- output


def _table(fmt: str, inputs: _Inputs, ids: list[str], labels: list[str | None],
           probs: np.ndarray, predicted: list[str], class_names: list[str]) -> pd.DataFrame:
    """Kaggle's `ImageId,Label`, or `id,class[,label],prob_<class>...` (label: the true class
    where the source knows it, e.g. a test split or class folders; empty elsewhere)."""
    if fmt == "kaggle":
        image_ids = inputs.image_ids(ids) if inputs.image_ids else np.arange(1, len(ids) + 1)
        return pd.DataFrame({KAGGLE_COLUMNS[0]: image_ids, KAGGLE_COLUMNS[1]: predicted})
    columns: dict[str, Any] = {"id": ids, "class": predicted}
    if any(lab is not None for lab in labels):
        columns["label"] = ["" if lab is None else lab for lab in labels]
    for k, name in enumerate(class_names):
        columns[f"prob_{name}"] = probs[:, k]
    return pd.DataFrame(columns)


def _check_out(out: str | os.PathLike) -> Path:
    """The output path, checked before any work: not a folder, and writable."""
    path = Path(out).expanduser().absolute()
    if path.is_dir():
        raise TlrayError(f"--out {str(out)!r} is a directory; expected a CSV file path")
    parent = path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise TlrayError(f"--out {str(out)!r}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK):
        raise TlrayError(f"--out {str(out)!r}: folder {existing} is not writable")
    return path


def _summary(rows: int, what: str, model: str, path: Path, fmt: str, predicted: list[str],
             class_names: list[str], accuracy: float | None, labelled: int) -> str:
    counts = Counter(predicted)
    shown = (class_names if len(class_names) <= _SUMMARY_CLASSES else
             [c for c, _ in counts.most_common(_SUMMARY_CLASSES)])
    dist = ", ".join(f"{c}: {counts.get(c, 0)}" for c in shown)
    if len(class_names) > len(shown):
        dist += f", ... ({len(class_names) - len(shown)} more classes)"
    try:
        where = os.path.relpath(path)
    except ValueError:
        where = str(path)
    where = where if not where.startswith("..") else str(path)
    kind = "Kaggle submission ImageId,Label" if fmt == "kaggle" else "class probabilities"
    line = (f"predicted {rows} rows of {what} with {model}: wrote {where} ({kind}); "
            f"predicted classes {dist}")
    if accuracy is not None:
        line += f"; accuracy {accuracy:.4f} on {labelled} labelled rows"
    return line

