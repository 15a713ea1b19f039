"""One training run, from its plan to a logged model: the unit a sweep trial repeats.

`train(plan)`: open an MLflow run (never left RUNNING) and log the resolved config and
dataset.json; launch the workers (`tlray.train.launch`), which train with checkpoints and
restart from the last one after a worker failure; log what the final checkpoint holds
(`tlray.train.finish`). The plan (`tlray.train.plan.preflight`) did every check first.
"""

from __future__ import annotations

import logging
import re
import os
import sys
from dataclasses import dataclass

import mlflow

from tlray.data.dataset import DatasetInfo
from tlray.serve import log_model as logged_model
from tlray.track.datasets import log_datasets
from tlray.track.figures import log_samples
from tlray.track.params import log_config, standard_tags
from tlray.track.runs import start_run
from tlray.track.store import ui_command
from tlray.train import checkpoint
from tlray.train.deadline import Deadline
from tlray.train.finish import log_final
from tlray.train.launch import fit
from tlray.train.plan import Plan
from tlray.train.protocol import Report, WorkerArgs


# Where a run's final checkpoint is (a path or storage URI): a sweep logs its pick's model
# from it.
FINAL_CHECKPOINT_TAG = "final_checkpoint"


@dataclass
class TrainResult:
    """What a finished run produced, and where to find it."""

    report: Report  # the final report: the best epoch's metrics and the test's
    history: list[dict]
    checkpoint_path: str  # the final checkpoint: best weights + test results
    run_id: str | None
    model_uri: str | None
    dataset: DatasetInfo

    @property
    def metrics(self) -> dict:
        return self.report.metrics()


def train(plan: Plan, *, parent_run_id: str | None = None, extra_tags: dict | None = None,
          callbacks: list | None = None, run_name: str | None = None,
          in_trial_process: bool = False, images: dict | None = None,
          goal: float | None = None, deadline: Deadline | None = None,
          evaluate: bool = True, log_model: bool = True) -> TrainResult:
    """Runs one planned configuration to completion and logs it to MLflow.

    Args:
        plan: from `tlray.train.plan.preflight`.
        parent_run_id: nests this run under a sweep's (or a comparison's) parent run.
        callbacks: extra Ray Train callbacks (a sweep passes Tune's reporting callback).
        run_name: MLflow/Ray run name (default: from the config).
        in_trial_process: train right here, in a Tune trial's process that holds one
            worker's resources (Ray Train's local mode); the loop reports to Tune itself.
        images: the dataset's splits from `launch.read_splits`, when the caller (a sweep)
            read them once for all its runs; read here otherwise.
        goal: stop training once `train.monitor` reaches it (a sweep's `tune.goal`).
        deadline: a budgeted sweep's trial stops training when its next epoch would end
            after it (`tlray.train.deadline`).
        evaluate: run `mlflow.models.evaluate` on the logged model (a sweep's trials leave
            it to the sweep, which evaluates the one it picks: `tune.pick.evaluate_pick`).
        log_model: log the model (as `tracking.log_model` says); a sweep's trial leaves it
            to the sweep, which logs the one it picks (`tune.log_models`).
    """
    cfg, info, minfo = plan.config, plan.dataset, plan.model
    if plan.cache is not None:
        role = "training" if plan.cache.trains_on_cache else "validating"
        print(f"feature cache: {role} what follows {plan.cache.cut} from {plan.cache.uri}",
              flush=True)
    tags = {**standard_tags(cfg.model.backbone, cfg.model.weights, cfg.model.freeze,
                            info.fingerprint),
   "dataset": info.name, **(extra_tags or {})}
    name = run_name or cfg.tracking.run_name or re.sub(
        r"[^\w.-]+", "_", f"{cfg.model.backbone}-f{cfg.model.freeze}")  # a directory name
    if evaluate and log_model and cfg.tracking.log_model and cfg.tracking.evaluate != "never":
        logged_model.import_evaluators()  # before the system-metrics thread below starts
    # CPU, memory (and GPU, where there is one) of this process's machine, as system/* metrics.
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # 4 lines per run
    with start_run(plan.experiment, run_name=name, tags=tags,
                   parent_run_id=parent_run_id) as run:
        run_id = run.info.run_id
        _log_plan(plan)
        data = log_datasets(info)
        if parent_run_id is None:  # a sweep's or a comparison's parent run shows them once
            log_samples(info)
        args = WorkerArgs(config=cfg, dataset=info, cache=plan.cache, run_id=run_id,
                          tracking_uri=plan.tracking_uri,
                          # A sweep's trials print side by side: their lines carry its name.
                          label=name if parent_run_id else None,
                          interactive=sys.stdout.isatty(), in_trial_process=in_trial_process,
                          # Names a run across restarts: Train keeps the MLflow run when it
                          # restarts a worker; Tune retries a trial in a new one.
                          restart_key=name if in_trial_process else run_id, fault=plan.fault,
                          goal=goal, deadline=deadline)
        found = fit(plan, args, name=f"{name}-{run_id[:8]}", callbacks=callbacks,
                    images=images)
        # Where the final checkpoint is: a sweep logs its pick's model from it.
        mlflow.set_tag(FINAL_CHECKPOINT_TAG, checkpoint_uri(found))
        with found.as_directory() as d:
            final = checkpoint.read_final(d, cfg.train.monitor)
            model_uri = log_final(final, plan, data["test"], evaluate=evaluate,
                                  log_model=log_model)
    return TrainResult(report=final.report, history=final.state.history,
                       checkpoint_path=found.path, run_id=run_id, model_uri=model_uri,
                       dataset=info)


def checkpoint_uri(found) -> str:
    """A Ray checkpoint's location as `ray.train.Checkpoint(...)` takes it back: a local
    path, or a URI on its storage (`s3://...`)."""
    scheme = getattr(found.filesystem, "type_name", "local")
    return found.path if scheme == "local" else f"{scheme}://{found.path}"


def _log_plan(plan: Plan) -> None:
    """The resolved config, the model's size, dataset.json and the feature-cache choice."""
    log_config(plan.config.to_dict())
    mlflow.log_params({"model.trainable_params": plan.model.trainable_params,
                       "model.total_params": plan.model.total_params,
                       "model.freeze_depth": plan.model.freeze_depth})
    mlflow.log_dict(plan.dataset.to_json(), "dataset.json")
    # Which cache the run used (or "not used: why"), and why it chose what it chose.
    mlflow.set_tags({"feature_cache": plan.cache.uri if plan.cache else plan.cache_note,
                     "feature_cache_reason": plan.cache_note,
                     "augmentation": plan.augment_note})


def summary(result: TrainResult) -> str:
    r = result.report
    e, t = r.epoch, r.test
    lines = [f"best epoch {r.best_epoch} of {r.epochs_run}"
             + (" (stopped early)" if r.stopped_early else ""),
             f"  val   loss {e.val_loss:.4f}  acc {e.val_acc:.4f}  auc {e.val_auc:.4f}",
             f"  test  loss {t.loss:.4f}  acc {t.acc:.4f}  auc {t.auc:.4f}",
             f"checkpoint: {result.checkpoint_path}",
             f"MLflow run: {result.run_id}  ({ui_command()})"]
    if result.model_uri:
        lines.append(f"model: {result.model_uri}")
    return "\n".join(lines)
