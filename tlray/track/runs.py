"""MLflow runs, parameters, metrics, pictures and the datasets a run used.

Training code calls these on rank 0 only. Everything resolves to absolute locations under
`paths.home()` unless `MLFLOW_TRACKING_URI` says otherwise, because a job started with
`ray job submit` runs in a temporary copy of the working directory and MLflow's defaults
(`./mlflow.db`, `./mlruns`) would vanish with it. Logged models are `tlray.serve.log_model`'s;
the registry is `tlray.track.registry`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.git_utils import get_git_commit
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from tlray import paths
from tlray.errors import Paused, TlrayError, traceback_text

_log = logging.getLogger(__name__)

_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
_SERVER_SCHEMES = ("http", "https", "databricks")


# --------------------------------------------------------------------------- where things go


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else an absolute SQLite store under `paths.home()`.

    SQLite (not a file store) because the model registry needs a database store.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    paths.home().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{paths.home() / 'mlflow.db'}"


def configure() -> str:
    """Point MLflow's fluent API at `tracking_uri()` and return it.

    Every public function here calls this first, so a changed `TLRAY_HOME` or
    `MLFLOW_TRACKING_URI` takes effect without restarting the process.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def _is_server(uri: str) -> bool:
    return urlparse(uri).scheme.lower() in _SERVER_SCHEMES


def default_artifact_location(experiment: str) -> str | None:
    """Absolute artifact folder for a new experiment; None lets a tracking server decide.

    A server's `--default-artifact-root` / `--serve-artifacts` is the only place every node of
    a cluster can reach, so it is left alone. Otherwise `<home>/mlartifacts/<experiment>`,
    with the name made safe as a single folder name.
    """
    if _is_server(tracking_uri()):
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return str(paths.home() / "mlartifacts" / folder)


def ui_command() -> str:
    """The command (or URL) a person uses to look at the runs this process logs."""
    uri = tracking_uri()
    if _is_server(uri):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def check_tracking_server(uri: str | None = None, timeout_s: float = 3.0) -> None:
    """Fail in seconds, before any training, when an http(s) tracking server is unreachable.

    Local stores (SQLite, files) need no check. Any HTTP answer below 500 counts as
    reachable: the point is to catch a wrong host/port or a server that is down, not to
    second-guess authentication.
    """
    uri = uri or tracking_uri()
    if urlparse(uri).scheme.lower() not in ("http", "https"):
        return
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s):  # noqa: S310 (http(s) only)
            return
    except urllib.error.HTTPError as err:
        if err.code < 500:
            return
        problem = f"answered HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        problem = f"is unreachable ({reason})"
    raise TlrayError(
        f"MLflow tracking server {uri} {problem} within {timeout_s:g} s. Start it "
        "(`mlflow server --host 0.0.0.0 --port 5000`) or set MLFLOW_TRACKING_URI to a reachable "
        "server, or unset it to use the local SQLite store."
    )


# --------------------------------------------------------------------------- experiments, runs


def get_or_create_experiment(name: str, artifact_location: str | None = None) -> str:
    """Return the id of experiment `name`, creating it with an absolute artifact location.

    Args:
        name: Experiment name.
        artifact_location: Overrides `default_artifact_location(name)` for a new experiment.
    """
    configure()
    if not name or not name.strip():
        raise TlrayError("experiment name is empty: expected a non-empty name")
    client = MlflowClient()
    existing = client.get_experiment_by_name(name)
    if existing is None:
        location = artifact_location or default_artifact_location(name)
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            # Another process (e.g. a parallel trial) created it between our get and create.
            existing = client.get_experiment_by_name(name)
            if existing is None:
                raise
    if existing.lifecycle_stage == "deleted":
        raise TlrayError(
            f"MLflow experiment {name!r} (id {existing.experiment_id}) is deleted: restore it "
            f"with `mlflow experiments restore --experiment-id {existing.experiment_id}` or "
            "choose another experiment name"
        )
    location = urlparse(existing.artifact_location or "")
    if location.scheme in ("", "file") and not os.path.isabs(location.path):
        _log.warning(
            "experiment %r keeps artifacts at the relative path %r: jobs submitted with "
            "`ray job submit` will write them into a temporary copy",
            name,
            existing.artifact_location,
        )
    return existing.experiment_id


def _end_status(exc: BaseException | None) -> str:
    """FINISHED on success or a clean exit, FAILED on an error, KILLED when interrupted."""
    if exc is None:
        return "FINISHED"
    if isinstance(exc, Paused):
        return "KILLED"
    if isinstance(exc, Exception):
        return "FAILED"
    # KeyboardInterrupt, GeneratorExit, cancellation, and SystemExit: what Ray Tune raises in
    # a trial it stops (ASHA, a goal, Ctrl-C), whatever its code; the run did not finish.
    return "KILLED"


def _finish(run_id: str, status: str) -> None:
    """End our run, and any nested run the block left open on top of it."""
    client = MlflowClient()
    if client.get_run(run_id).info.status != "RUNNING":
        return  # the block ended it itself
    active = mlflow.active_run()
    while active is not None and active.info.run_id != run_id:
        mlflow.end_run(status)  # started after ours, so nested under it, and never ended
        active = mlflow.active_run()
    if active is None:
        client.set_terminated(run_id, status)
    else:
        mlflow.end_run(status)


@contextlib.contextmanager
def start_run(
    experiment: str,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or, with `run_id`, resume) a run that never stays RUNNING, whatever happens.

    Success ends it FINISHED; an exception FAILED; KeyboardInterrupt (or another interruption)
    KILLED. The exception is always re-raised. A run started while another is active, or
    with `parent_run_id` (a sweep's trial in another process), is nested under it and carries
    the `mlflow.parentRunId` tag.

    Args:
        experiment: Experiment name; created on first use.
        run_name: Display name of the run.
        tags: Extra run tags (values are stringified).
        parent_run_id: Id of the sweep's parent run.
        run_id: An existing run to continue (e.g. a resumed sweep's parent run).
    """
    experiment_id = get_or_create_experiment(experiment)
    nested = mlflow.active_run() is not None
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id, nested=nested)
    else:
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name,
            tags={k: str(v) for k, v in (tags or {}).items()},
            parent_run_id=parent_run_id,
            nested=nested,
        )
    run_id = run.info.run_id
    try:
        yield run
    except BaseException as exc:
        try:
            if isinstance(exc, Exception) and not isinstance(exc, Paused):
                _keep_traceback(run_id, exc)
            _finish(run_id, _end_status(exc))
        except Exception:  # never hide the original error behind a bookkeeping one
            _log.exception("could not mark MLflow run %s as ended", run_id)
        raise
    _finish(run_id, "FINISHED")


ERROR_ARTIFACT = "error.txt"


def _keep_traceback(run_id: str, exc: Exception) -> None:
    """The failed run keeps the error's whole traceback as an artifact, and the error says
    where it is (the innermost run an error passes through names itself first)."""
    MlflowClient().log_text(run_id, traceback_text(exc), ERROR_ARTIFACT)
    if not any(ERROR_ARTIFACT in note for note in getattr(exc, "__notes__", [])):
        exc.add_note(f"full traceback: artifact {ERROR_ARTIFACT} of MLflow run {run_id} "
                     f"({ui_command()})")


def end_run_with_status(run_id: str, status: str) -> None:
    """End a run another process left open (e.g. a trial the scheduler stopped)."""
    status = status.upper()
    if status not in _END_STATUSES:
        raise TlrayError(f"run status {status!r} is not valid: expected one of {_END_STATUSES}")
    configure()
    MlflowClient().set_terminated(run_id, status)


def close_dangling_runs(
    *,
    experiment_id: str | None = None,
    parent_run_id: str | None = None,
    status: str = "KILLED",
) -> list[str]:
    """End every RUNNING run under a parent run (all its descendants) or in an experiment.

    Ray Tune kills the processes of trials that ASHA stops, so their runs never get to end
    themselves; the sweep driver calls this when the sweep is over. With `experiment_id`
    every RUNNING run in the experiment is ended, so only use it when nothing else is
    running there.

    Returns:
        The ids of the runs that were ended.
    """
    if (experiment_id is None) == (parent_run_id is None):
        raise TlrayError("close_dangling_runs: give exactly one of experiment_id or parent_run_id")
    configure()
    if experiment_id is not None:
        running = _search(experiment_id, "attributes.status = 'RUNNING'")
        for run in running:
            end_run_with_status(run.info.run_id, status)
        return [run.info.run_id for run in running]

    experiment_of_parent = MlflowClient().get_run(parent_run_id).info.experiment_id
    closed: list[str] = []
    frontier = [parent_run_id]
    while frontier:
        parent = frontier.pop()
        for child in _search(experiment_of_parent, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'"):
            frontier.append(child.info.run_id)
            if child.info.status == "RUNNING":
                end_run_with_status(child.info.run_id, status)
                closed.append(child.info.run_id)
    return closed


def _search(experiment_id: str, filter_string: str) -> list[Run]:
    """All runs matching a filter; `mlflow.search_runs` pages through results for us."""
    return mlflow.search_runs(
        experiment_ids=[experiment_id], filter_string=filter_string, output_format="list"
    )


# --------------------------------------------------------------------------- logging helpers


def _plain(value: Any) -> Any:
    """Dataclasses, paths, enums and tuples as YAML-safe builtins."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as `section.key` -> string value; lists stay one value."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = "None" if value is None else str(value)
    return flat


def log_config(config: Mapping[str, Any] | Any) -> None:
    """Log the resolved config as flat params and as a `config.yaml` artifact.

    Params make runs comparable in the UI; the YAML file is the exact config to rerun with.
    Values longer than MLflow's 6000-character limit are truncated in the params only.
    """
    plain = _plain(config)
    if not isinstance(plain, dict):
        raise TypeError(f"log_config expects a dict or dataclass, got {type(config).__name__}")
    params = flatten_config(plain)
    for key, value in params.items():
        if len(value) > MAX_PARAM_VAL_LENGTH:
            _log.warning("param %s is %d chars long; truncated (see config.yaml)", key, len(value))
            params[key] = value[: MAX_PARAM_VAL_LENGTH - 3] + "..."
    items = list(params.items())
    for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        mlflow.log_params(dict(items[start : start + MAX_PARAMS_TAGS_PER_BATCH]))
    mlflow.log_dict(plain, "config.yaml")


def log_epoch_metrics(metrics: Mapping[str, Any], epoch: int) -> dict[str, float]:
    """Log one epoch's metrics at step=epoch, skipping NaN/inf values with a warning.

    A diverged loss should show up as a gap in the curves and a warning, not crash the run
    that would have reported it.

    Returns:
        The metrics that were logged.
    """
    finite: dict[str, float] = {}
    for key, value in metrics.items():
        number = float(value)
        if math.isfinite(number):
            finite[key] = number
        else:
            _log.warning("metric %s=%s at epoch %d is not finite: not logged", key, value, epoch)
    if finite:
        mlflow.log_metrics(finite, step=int(epoch))
    return finite


def link_metrics(run_id: str, model_id: str, keys: list[str], step: int) -> None:
    """Attaches the run's `keys` at `step` (e.g. the best epoch's) to a logged model, which is
    how the MLflow UI's Models tab lists and sorts them. The values keep their timestamps, so
    the run's own history gains no second entry."""
    from mlflow.entities import Metric

    client = MlflowClient()
    linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id)
              for key in keys for m in client.get_metric_history(run_id, key)
              if m.step == step]
    if linked:
        client.log_batch(run_id, metrics=linked)


def log_figure(fig: Any, artifact_file: str) -> None:
    """Log a matplotlib figure (e.g. `plots/curves.png`) and close it to free its memory."""
    mlflow.log_figure(fig, artifact_file, save_kwargs={"dpi": 100, "bbox_inches": "tight"})
    from tlray.track.plots import close

    close(fig)


def git_commit(path: str | os.PathLike[str] | None = None) -> str | None:
    """The checkout's HEAD commit, or None outside a git checkout (never raises)."""
    try:
        return get_git_commit(str(path or os.getcwd()))
    except Exception:
        return None


def standard_tags(
    backbone: str, weights: str, freeze: int | str, dataset_hash: str
) -> dict[str, str]:
    """Run tags every training run carries, so runs can be filtered by what they trained;
    `freeze` as the user wrote it (a depth, or a schedule such as all:2,0@0.5)."""
    tags = {
        "backbone": backbone,
        "weights": weights,
        "freeze": str(freeze),
        "dataset_hash": dataset_hash,
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    return tags


# --------------------------------------------------------------------------- datasets

# A run's splits as MLflow calls them (the UI's Datasets column shows the context).
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


def split_dataset(info: Any, split: str) -> Any:
    """One split of a prepared dataset as an MLflow dataset (metadata only, no rows copied).

    Named `<dataset>-<split>`, with the dataset's fingerprint as its digest (the run's
    `dataset_hash` tag, shortened) and the split's folder as its source.
    """
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types.schema import ColSpec, Schema

    with warnings.catch_warnings():  # "can be interpreted in multiple ways" for local paths
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(f"{info.uri.rstrip('/')}/{split}")
    schema = Schema([ColSpec("binary", "image"), ColSpec("long", "label"),
                     ColSpec("string", "id")])
    return MetaDataset(source, name=f"{info.name}-{split}", digest=info.fingerprint[:12],
                       schema=schema)


def log_datasets(info: Any, splits: tuple[str, ...] = tuple(SPLIT_CONTEXTS)) -> dict[str, Any]:
    """Record which splits the active run trained, validated and tested on.

    Returns:
        split -> the MLflow dataset, e.g. to link the test metrics to the test split.
    """
    datasets = {split: split_dataset(info, split) for split in splits}
    mlflow.log_inputs(datasets=list(datasets.values()),
                      contexts=[SPLIT_CONTEXTS[s] for s in splits],
                      tags_list=[{"rows": str(info.splits[s].rows)} for s in splits])
    return datasets


def log_samples(info: Any) -> None:
    """One training image of every class, as `plots/samples.png`: what the run learns from,
    at a glance (both original experiments open with such a grid)."""
    from tlray.data.dataset import sample_per_class
    from tlray.track.plots import sample_grid

    images, labels = sample_per_class(info, "train")
    log_figure(sample_grid(images, labels, info.classes), "plots/samples.png")
