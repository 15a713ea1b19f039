"""MLflow runs that never stay RUNNING: experiments, starting and ending a run, and the runs
another process left open.

Training code calls these on rank 0 only. Logged models are `tlray.serve.log_model`'s; the
registry is `tlray.track.registry`'s; where runs are stored, `tlray.track.store`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from tlray.errors import Paused, TlrayError, traceback_text
from tlray.track.store import configure, default_artifact_location, ui_command

_log = logging.getLogger(__name__)

_END_STATUSES = ("FINISHED", "FAILED", "KILLED")


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
