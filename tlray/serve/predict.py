"""Predictions from a logged tlray model on new images: `tlray predict`.

A thin client of the model itself: the model's pyfunc (`tlray.serve.pyfunc.ImageClassifier`)
converts channels, resizes and normalises exactly as training did, so `tlray predict` only
finds the images (`predict_inputs`), hands them over as they are and writes the answers
(`predict_output`). The model is found and checked by `predict_model`.

Where the scoring runs: in this process for small inputs, or as a Ray Data pipeline over a pool
of model replicas on the cluster (`predict_ray`) for large ones or when asked (`engine`). Both
read the same batches with the same reader and score them with the same function
(`predict_scoring.score`), so they write the same file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from tlray.data.executors import RayPaysFrom, join_or_start_ray
from tlray.data.sources import locate
from tlray.errors import TlrayError
from tlray.serve.predict_inputs import SOURCES, Inputs, open_inputs
from tlray.serve.predict_model import (  # noqa: F401  (MODEL_URI_HELP: for the CLI)
    MODEL_URI_HELP,
    check_image_model,
    describe_model,
    load_model,
    model_info,
    normalise_uri,
)
from tlray.serve.predict_output import (  # noqa: F401  (write_csv_atomic: for callers)
    DEFAULT_OUT,
    FORMATS,
    Answers,
    check_out,
    write_csv_atomic,
)
from tlray.serve.predict_scoring import score

# Importing this module imports neither torch nor mlflow (the CLI reads these names to build
# its parser); the model's pyfunc is loaded when a prediction starts.
ENGINES = ("auto", "local", "ray")
# `engine="auto"` scores this many images or more on Ray. Measured with `tlray benchmark
# predict` on the 2-core laptop (28x28 PNGs, 2 replicas at 1.06x the local loop once
# running): Ray finishes first from ~95,000 images with Ray running, ~148,000 starting it.
RAY_FROM_IMAGES = RayPaysFrom(running=100_000, starting=150_000)


def predict(
    model_uri: str,
    source: str | os.PathLike,
    *,
    split: str | None = None,
    out: str | os.PathLike | None = None,
    batch_size: int = 256,
    format: str = "auto",  # noqa: A002 (the CLI option's name)
    verbose: bool = True,
    engine: str = "local",
    replicas: int | None = None,
    cpus_per_replica: float = 1.0,
    gpu: bool = False,
    connect=None,
    keep_table: bool = True,
) -> pd.DataFrame:
    """Predicts every image of `source` with a logged tlray model and writes the answers.

    Every input problem (unknown model, alias or version, a model that does not take raw
    images, a missing or malformed source, an unwritable output path, a bad option) is a
    `TlrayError` raised before the model is loaded or any image is predicted; images the
    model cannot read are named all together once every image was tried, and then nothing
    is written.

    Args:
        model_uri: see `tlray.serve.predict_model`.
        source: a prepared dataset directory, a pixel CSV (or a directory holding Kaggle's
            test.csv), an image folder, a .zip of one, or one image file; folders, zips and
            datasets may be URIs (`s3://...`).
        split: the prepared dataset's split to predict (default `predict` if it has one,
            else `test`). Only for prepared datasets.
        out: the CSV to write (default `./submission.csv` for the Kaggle format,
            `./predictions.csv` otherwise), or a folder name ending in `.parquet` for
            Parquet shards; a local path or a URI. Parent folders are created.
        batch_size: images per call of the model.
        format: "kaggle" (`ImageId,Label`), "probs" (`id,class[,label],prob_<class>...`), or
            "auto": kaggle for a test.csv or a Kaggle dataset's predict split, else probs.
        verbose: show a progress bar (images/s, time left) and print a one-line summary.
        engine: "local" (the default here) scores in this process, "ray" on a pool of model
            replicas on the Ray cluster, "auto" (the CLI's default) on Ray from
            `RAY_FROM_IMAGES` images (or with `replicas`).
        replicas, cpus_per_replica, gpu: the Ray pool (see `predict_ray.score_on_ray`).
        connect: joins or starts Ray before the pool starts (the CLI passes tlray's
            `init_ray`; by default a plain `ray.init()`).
        keep_table: return every row written (the CLI, which only prints the summary, does
            not keep them: the driver then holds one batch of answers at a time).

    Returns:
        The table written (empty without `keep_table`); `.attrs` holds "path" (the output),
        "summary" (the summary line), "model_uri" (the exact logged model used) and
        "accuracy" (or None when no row had a known label).
    """
    _check_options(format, batch_size, engine, replicas, cpus_per_replica)
    where = locate(str(source), expected=SOURCES)
    model_uri = normalise_uri(model_uri)
    info = model_info(model_uri)
    class_names = check_image_model(info, model_uri)
    inputs = open_inputs(where, split, class_names)
    fmt = format if format != "auto" else ("kaggle" if inputs.kaggle else "probs")
    path = check_out(out if out is not None else Path.cwd() / DEFAULT_OUT[fmt])
    on_ray = engine == "ray" or (engine == "auto" and (
        replicas is not None or inputs.rows >= RAY_FROM_IMAGES.now()))
    resolved = info.model_uri or model_uri

    if on_ray:  # before the progress bar starts: joining prints Ray's own lines
        (connect or join_or_start_ray)()
    answers = Answers(path, fmt, inputs, class_names, keep=keep_table)
    try:
        stream = (_score_on_ray(inputs, resolved, model_uri, class_names, batch_size, replicas,
                                cpus_per_replica, gpu, connect) if on_ray
                  else _score_here(inputs, resolved, model_uri, class_names, batch_size, gpu))
        with closing(stream), tqdm(total=inputs.rows, unit="img", leave=False,
                                   desc=f"predict ({'ray' if on_ray else 'this process'})",
                                   disable=not verbose) as bar:
            for table in stream:
                answers.add(table)
                bar.update(table.num_rows)
        answers.commit()
    except BaseException:
        answers.abort()
        raise
    summary = answers.summary(describe_model(model_uri))
    frame = answers.table()
    frame.attrs.update(path=path, summary=summary, model_uri=resolved,
                       accuracy=answers.accuracy)
    if verbose:
        print(summary)
    return frame


def _check_options(format: str, batch_size, engine: str, replicas,  # noqa: A002
                   cpus_per_replica) -> None:
    """Every option checked before anything is read."""
    if format not in FORMATS:
        raise TlrayError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise TlrayError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if engine not in ENGINES:
        raise TlrayError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if replicas is not None and (not isinstance(replicas, int) or replicas < 1):
        raise TlrayError(f"--replicas must be a positive integer, got {replicas!r}")
    if engine == "local" and replicas is not None:
        raise TlrayError("--replicas is for --engine ray (or auto): --engine local scores in "
                         "this process")
    if not cpus_per_replica > 0:
        raise TlrayError(f"--cpus-per-replica must be more than 0, got {cpus_per_replica!r}")


def _score_here(inputs: Inputs, resolved: str, model_uri: str, class_names: list[str],
                batch_size: int, gpu: bool) -> Iterator[pa.Table]:
    """The answers, batch by batch, from the model loaded in this process."""
    if gpu:
        import torch

        if not torch.cuda.is_available():
            raise TlrayError("--gpu: this machine has no CUDA GPU that torch can use; "
                             "predict without --gpu, or with --engine ray on a GPU cluster")
    model = load_model(resolved, model_uri, "cuda" if gpu else "cpu")
    for batch in inputs.reader(inputs.refs, batch_size):
        yield score(model, batch, class_names)


def _score_on_ray(inputs: Inputs, resolved: str, model_uri: str, class_names: list[str],
                  batch_size: int, replicas, cpus_per_replica: float, gpu: bool,
                  connect) -> Iterator[pa.Table]:
    from tlray.serve.predict_ray import score_on_ray
    from tlray.track import store as tracking

    return score_on_ray(inputs, model_uri=resolved, shown_uri=model_uri,
                        tracking_uri=tracking.tracking_uri(), class_names=class_names,
                        batch_size=batch_size, replicas=replicas,
                        cpus_per_replica=cpus_per_replica, gpu=gpu, connect=connect)
