"""After a sweep: the best completed trial by its best validation metric, registered (the
`champion` alias moves only when its test metric beats the current champion's), and the
results table and plot on the parent run."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tlray import config as config_mod
from tlray.config import Config
from tlray.errors import TlrayError
from tlray.track import plots, registry
from tlray.track.figures import log_figure
from tlray.track.runs import end_run_with_status
from tlray.track.store import ui_command
from tlray.track.metrics import best_of, format_number
from tlray.train.checkpoint import read_final
from tlray.train.finish import EVALUATED_BY_THE_SWEEP, evaluate_logged, log_picked_model
from tlray.train.protocol import is_final
from tlray.train.run import FINAL_CHECKPOINT_TAG
from tlray.tune.goal import Goal
from tlray.tune.importance import Importance
from tlray.tune.importance import plots as importance_plots
from tlray.tune.trial import trial_config


@dataclass
class SweepResult:
    name: str
    path: str
    parent_run_id: str
    best_config: dict  # the searched values of the winner
    best_metrics: dict  # its val and test metrics
    best_run_id: str
    model_uri: str | None
    registered: registry.RegistrationResult | None
    registered_name: str
    trials: list[dict]  # one row per trial: searched values, status, metrics
    goal_trial: str | None = None  # the trial that reached tune.goal and ended the sweep
    importance: Importance | None = None
    importance_note: str = ""


# A trial's status in the results table.
COMPLETED, STOPPED, GOAL_STOPPED, NOT_STARTED, NO_TIME, ERROR = (
    "COMPLETED", "STOPPED", "STOPPED (goal)", "NOT STARTED (goal)", "NOT STARTED (budget)",
    "ERROR")


def pick_and_register(cfg, info, results, parent_id: str, registered_name: str,
                      goal: Goal) -> dict:
    """The best trial by its best validation metric; only completed trials have been tested.

    Args:
        results: every Tune result of the sweep (of each of its parts, once grown).
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    metric, mode = cfg.train.monitor, cfg.monitor_mode
    # Oldest first, so that a retried trial's last attempt (the one that finished) wins.
    children = {r.data.tags.get("tune_trial_id"): r for r in client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_id}'", max_results=10_000,
        order_by=["attributes.start_time ASC"])}
    trials = [_trial_row(r, children, metric, goal) for r in results]
    best = best_of([t for t in trials if t["status"] == COMPLETED], lambda t: t[metric], mode)
    if best is None:
        errors = [r.error for r in results if r.error]
        if errors:
            raise errors[0]  # a user's mistake (TlrayError) or a bug: the cause, as it is
        raise TlrayError(f"no trial of the sweep completed ({len(trials)} stopped before "
                         f"their last epoch); run more trials, or a longer tune.grace_period")
    best_result = next(r for r in results if (r.metrics or {}).get("trial_id") == best["trial_id"])
    best_metrics = {k: v for k, v in best_result.metrics.items()
                    if k.startswith(("val_", "test_", "best_", "train_"))}
    registered = None
    if best["model_uri"] is None and cfg.tracking.log_model and best["mlflow_run_id"]:
        best["model_uri"] = log_pick(cfg, info, best_result, best["mlflow_run_id"])
    if best["model_uri"]:
        run = client.get_run(best["mlflow_run_id"])
        evaluate_pick(cfg, info, run, best["model_uri"])
        registered = _register(cfg, info, registered_name, best_result.metrics, run,
                               len(trials))
    return {"best_config": {k: best[k] for k in best_result.config},
            "best_metrics": best_metrics, "best_run_id": best["mlflow_run_id"],
            "model_uri": best["model_uri"], "registered": registered, "trials": trials,
            "goal_trial": goal.trial}


def log_pick(cfg: Config, info, result, run_id: str) -> str:
    """The picked trial's model, logged to its run now (`tune.log_models=pick`: trials leave
    it to the sweep), from its final checkpoint and with its own settings; returns its URI.

    A trial's export (torch.export, the pyfunc's files, its metrics linked) costs 3-4 s of
    CPU: for every trial that lost, that is time a budget could have trained.
    """
    import mlflow
    from mlflow import MlflowClient
    from ray.train import Checkpoint

    trial_cfg = trial_config(cfg, result.config)
    # The trial's run says where (a multi-worker trial's Train run kept it, not Tune).
    where = MlflowClient().get_run(run_id).data.tags.get(FINAL_CHECKPOINT_TAG)
    found = Checkpoint(where) if where else result.checkpoint
    with found.as_directory() as d:
        final = read_final(d, cfg.train.monitor)
        mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
        try:
            return log_picked_model(final, trial_cfg, info)
        finally:  # FINISHED, as it was: a Ctrl-C here does not undo the trial
            mlflow.end_run()


def evaluate_pick(cfg: Config, info, run, model_uri: str) -> None:
    """`mlflow.models.evaluate` of the picked trial's logged model, on that trial's run.

    Trials leave it to the sweep (`train.finish.EVALUATED_BY_THE_SWEEP`): each has its test
    metrics already, and serving the whole test split through the pyfunc (2-3 s a model on a
    2-core laptop) is worth it for the model a person deploys, not for every one that lost.
    """
    import mlflow

    if run.data.tags.get("mlflow_evaluate") != EVALUATED_BY_THE_SWEEP:
        return  # evaluated already: a resumed or grown sweep that picks it again
    model_id = mlflow.models.get_model_info(model_uri).model_id
    mlflow.start_run(run_id=run.info.run_id, nested=mlflow.active_run() is not None)
    try:
        evaluate_logged(cfg, info, model_uri, model_id)
    finally:  # FINISHED, as it was: a Ctrl-C here does not undo the trial
        mlflow.end_run()


def _trial_row(result, children: dict, metric: str, goal: Goal) -> dict:
    m = result.metrics or {}
    trial_id = m.get("trial_id") or getattr(result, "trial_id", None)
    child = children.get(trial_id)
    if child is not None and result.error is None and child.info.status == "FAILED":
        # Stopped by ASHA or the goal, its Train run broke mid-way and the trial recorded
        # a failure. It was stopped, not broken.
        end_run_with_status(child.info.run_id, "KILLED")
    if result.error:
        status = ERROR
    elif is_final(m):
        status = COMPLETED
    elif not m:  # the goal was reached, or (without a goal) the budget left it no time
        status = NOT_STARTED if goal.reached else NO_TIME
    else:
        status = GOAL_STOPPED if trial_id in goal.stopped else STOPPED
    return {"trial_id": trial_id, **(result.config or {}), "status": status,
            "epochs": m.get("epochs_run", m.get("epoch")),
            "stopped_early": bool(m.get("stopped_early")),  # patience, goal or deadline
            metric: m.get(f"best_{metric}", m.get(metric)),
            "test_acc": m.get("test_acc"), "test_auc": m.get("test_auc"),
            "seconds": m.get("time_total_s"),  # the whole trial, start-up included
            "epochs_seconds": m.get("epochs_seconds"),  # its epochs (train + validation)
            "mlflow_run_id": child.info.run_id if child else None,
            "model_uri": child.data.tags.get("model_uri") if child else None}


def _register(cfg: Config, info, registered_name: str, metrics: dict, run,
              trials: int) -> registry.RegistrationResult:
    """The winner as a new version: plain tags, the alias if it beats the champion, and a
    description a person can choose by in the MLflow UI (written by the registry)."""
    champion = cfg.tune.champion_metric
    winner = _winner(run, metrics, cfg.train.monitor, trials)
    tags = {**{f"val_{k}": v for k, v in winner.val.items()},
            **{f"test_{k}": v for k, v in winner.test.items()},
            "backbone": winner.backbone, "weights": winner.weights,
            "freeze": winner.freeze, "lr": f"{winner.lr:.4g}",
            "epochs": metrics.get("epochs_run"), "dataset": info.name,
            "dataset_hash": info.fingerprint, "run_id": run.info.run_id,
            "sweep_run_id": run.data.tags.get("mlflow.parentRunId")}
    result = registry.register_champion(
        run.data.tags["model_uri"], registered_name, champion, metrics[champion],
        mode=config_mod.CHAMPION_METRICS[champion], tags=tags)
    registry.describe_winner(registered_name, result, winner, info, champion, metrics[champion])
    return result


def _winner(run, metrics: dict, monitor: str, trials: int) -> registry.Winner:
    """The pick as the registry describes it: its trial's settings as its MLflow run logged
    them (a trial's searched values are not the sweep's config), and its results."""
    p = run.data.params
    return registry.Winner(
        run_id=run.info.run_id, run_name=run.info.run_name,
        backbone=p["model.backbone"], weights=p["model.weights"], freeze=p["model.freeze"],
        lr=float(p["optim.lr"]), optimizer=p["optim.name"], schedule=p["optim.schedule"],
        epochs=int(p["train.epochs"]), batch_size=int(p["data.batch_size"]),
        image_size=int(p["data.image_size"]),
        trainable_params=int(p["model.trainable_params"]),
        total_params=int(p["model.total_params"]),
        ema=None if p.get("train.ema") in (None, "None") else float(p["train.ema"]),
        tta=p.get("model.tta", "none"),
        val={k: metrics.get(f"val_{k}") for k in ("acc", "auc", "loss")},
        test={k: metrics.get(f"test_{k}") for k in ("acc", "auc", "loss")},
        epochs_run=metrics.get("epochs_run"), best_epoch=metrics.get("best_epoch"),
        monitor=monitor, trials=trials, run_metrics=run.data.metrics)


def describe_trials(trials: list[dict], metric: str, best_run_id: str | None) -> None:
    """Each trial's run page says what it tried and what became of it, in one line (the
    MLflow UI shows it as the run's description): comparing trials needs no look at their
    params."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for trial in trials:
        if trial.get("mlflow_run_id"):
            client.set_tag(trial["mlflow_run_id"], "mlflow.note.content",
                           trial_description(trial, metric,
                                             trial["mlflow_run_id"] == best_run_id))


def trial_description(trial: dict, metric: str, picked: bool) -> str:
    """E.g. "freeze `all:2,0@0.5`, lr 0.0052: trained all 6 epochs, best val_loss 0.0311,
    test accuracy 0.9920; the sweep's pick"."""
    best = trial.get(metric)
    reached = f"best {metric} {format_number(best)}" if best is not None else "no epoch finished"
    epochs = trial.get("epochs")
    trained = (f"stopped itself after epoch {epochs}" if trial.get("stopped_early")
               else f"trained all {epochs} epochs")
    ended = {COMPLETED: f"{trained}, {reached}, test accuracy "
                        f"{format_number(trial.get('test_acc'))}",
             STOPPED: f"stopped by ASHA after epoch {epochs} ({reached})",
             GOAL_STOPPED: f"stopped after epoch {epochs}: another trial reached the goal "
                           f"({reached})",
             ERROR: f"failed ({reached})"}.get(trial["status"], trial["status"].lower())
    return (f"freeze `{trial.get('model.freeze')}`, lr {format_number(trial.get('optim.lr'))}: {ended}"
            + ("; the sweep's pick" if picked else ""))


def log_sweep(trials: list[dict], metric: str, importance: Importance | None,
              study=None) -> None:
    """The results table, the sweep plot and which settings mattered, on the parent run."""
    import mlflow
    import pandas as pd

    frame = pd.DataFrame(trials)
    mlflow.log_text(frame.to_csv(index=False), "sweep_results.csv")
    rows = [{"lr": t["optim.lr"], "freeze_depth": t["model.freeze"], metric: t[metric]}
            for t in trials if t.get(metric) is not None and "optim.lr" in t]
    if rows:
        log_figure(plots.sweep_plot(rows, metric), "plots/sweep.png")
    if importance is not None:
        mlflow.log_text(pd.Series(importance.values, name="importance").rename_axis(
            "setting").to_csv(), "importance.csv")
        mlflow.log_metrics({f"importance.{k}": v for k, v in importance.values.items()})
        bars, lines = importance_plots(study, list(importance.values))
        log_figure(bars, "plots/importance.png")
        log_figure(lines, "plots/parallel_coordinates.png")


def format_summary(result: SweepResult, monitor: str) -> str:
    m = result.best_metrics
    searched = ", ".join(f"{k}={format_number(v)}" for k, v in result.best_config.items())
    counts = Counter(t["status"] for t in result.trials)
    said = {COMPLETED: "completed", STOPPED: "stopped early by ASHA",
            GOAL_STOPPED: "stopped by the goal", NOT_STARTED: "not started: the goal was "
            "reached", NO_TIME: "not started: no time left in the budget", ERROR: "failed"}
    lines = [f"sweep {result.name}: {len(result.trials)} trials ("
             + ", ".join(f"{counts[s]} {said[s]}" for s in said if counts[s]) + ")"]
    if result.goal_trial:
        lines.append(f"the goal stopped the sweep: trial {result.goal_trial} reached it")
    lines += [f"best trial: {searched}",
              f"  best {monitor} {format_number(m.get(f'best_{monitor}'))}  val_acc "
              f"{format_number(m.get('val_acc'))}",
              f"  test  acc {format_number(m.get('test_acc'))}  auc {format_number(m.get('test_auc'))}  "
              f"loss {format_number(m.get('test_loss'))}"]
    if result.importance is not None:
        lines.append(f"which settings mattered (importance of each for the best {monitor}):")
        lines.append(result.importance.table())
    if result.importance_note:
        lines.append(f"  ({result.importance_note})")
    if result.registered is not None:
        r = result.registered
        lines.append(f"registered: models:/{result.registered_name}/{r.version}; champion is "
                     f"version {r.champion_version}"
                     + (" (moved to this one)" if r.moved else " (kept: not beaten)"))
        lines.append(f"load it: mlflow.pyfunc.load_model('models:/{result.registered_name}"
                     f"@champion').predict(images); serve it: mlflow models serve -m "
                     f"models:/{result.registered_name}@champion --env-manager local -p 5001")
    lines.append(f"MLflow parent run {result.parent_run_id}: {ui_command()}")
    return "\n".join(lines)

