"""Logging a finished run to MLflow: what its final checkpoint holds, as a person wants it.

Learning curves, the confusion matrix, a grid of test predictions, the test metrics (linked
to the test split and to the logged model), every test row's probabilities, and the best
model as a pyfunc that takes raw images (evaluated by `mlflow.models.evaluate`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from tlray.config import schedule
from tlray.data.dataset import DatasetInfo, sample_per_class
from tlray.model.build import ModelInfo, build_for_run
from tlray.serve import log_model as logged_model
from tlray.track import plots
from tlray.track.figures import log_figure
from tlray.track.run_metrics import link_metrics
from tlray.train.checkpoint import FinalCheckpoint
from tlray.train.plan import Plan

EVALUATED_BY_THE_SWEEP = "not run here: the sweep runs it on the trial it picks"


def log_final(final: FinalCheckpoint, plan: Plan, test_data, *,
              evaluate: bool = True, log_model: bool = True) -> str | None:
    """Logs `final` to the active MLflow run; returns the logged model's URI (None if the
    config says not to log it, or `log_model=False`).

    The logged model gets the best epoch's validation metrics and the test metrics (which
    are also linked to the test split, `test_data`). `evaluate=False` (a sweep's trial)
    leaves `mlflow.models.evaluate` to the caller, which runs it on the model it picks;
    `log_model=False` (a sweep's trial, `tune.log_models=pick`) leaves the model to it too
    (`log_picked_model`).
    """
    import mlflow

    cfg, info, report = plan.config, plan.dataset, final.report
    history, test = final.state.history, final.test
    phases = schedule.parse(cfg.model.freeze, cfg.train.epochs)
    starts = [schedule.phase_epochs(phases, i, cfg.train.epochs)[0] for i in range(1, len(phases))]
    log_figure(plots.learning_curves(history, [s for s in starts
                                               if s <= len(history)]),
               "plots/learning_curves.png")
    log_figure(plots.confusion_matrix_plot(np.array(test["confusion_matrix"]),
                                           info.classes),
               "plots/confusion_matrix.png")
    mlflow.log_dict(test, "test_metrics.json")
    mlflow.log_artifact(str(final.predictions))
    mlflow.log_metrics({f"test_acc_{c}": v for c, v in test["per_class_acc"].items()
                        if v == v})
    if final.samples is not None:
        s = final.samples
        log_figure(plots.predictions_grid(s["images"], s["labels"], s["preds"],
                                          info.classes),
                   "plots/test_predictions.png")
    if "tta" in test:
        t = test["tta"]
        mlflow.log_metrics({"test_acc_without_tta": t["acc_without_tta"],
                            "test_ms_per_image": t["ms_per_image"],
                            "test_ms_per_image_without_tta": t["ms_per_image_without_tta"]})
    model_uri = model_id = None
    if cfg.tracking.log_model and log_model:
        model_uri, model_id = log_trained_model(final, cfg, info)
    mlflow.log_metrics(final_test_metrics(final), step=report.epochs_run, model_id=model_id,
                       dataset=test_data)
    if not cfg.tracking.log_model:
        return None
    if model_uri is not None and (evaluate or cfg.tracking.evaluate == "never"):
        evaluate_logged(cfg, info, model_uri, model_id)
    else:
        mlflow.set_tag("mlflow_evaluate", EVALUATED_BY_THE_SWEEP)
    return model_uri


def log_picked_model(final: FinalCheckpoint, cfg, info: DatasetInfo) -> str:
    """The model of a sweep's trial that left it to the sweep (`tune.log_models=pick`),
    logged to the active run (the trial's) once the sweep picked it, with the same metrics
    linked to it as `log_final` links; returns its URI."""
    import mlflow

    from tlray.track.datasets import split_dataset

    model_uri, model_id = log_trained_model(final, cfg, info)
    link_metrics(mlflow.active_run().info.run_id, model_id, list(final_test_metrics(final)),
                 final.report.epochs_run, dataset=split_dataset(info, "test"))
    return model_uri


def log_trained_model(final: FinalCheckpoint, cfg, info: DatasetInfo) -> tuple[str, str]:
    """The final checkpoint's network as a logged model of the active run, tagged on it
    (`model_uri`), the best epoch's metrics linked to it; returns (URI, model id)."""
    import mlflow

    network, minfo = trained_network(cfg, info, final)
    logged = logged_model.log_model(
        network, model_example_images(info), info.classes,
        {"mean": minfo.data_config["mean"], "std": minfo.data_config["std"],
         "size": [cfg.data.image_size] * 2, "channels": info.channels,
         "tta": cfg.model.tta})
    mlflow.set_tag("model_uri", logged.model_uri)
    # The best epoch's metrics go with the model: its weights are that epoch's.
    report = final.report
    link_metrics(mlflow.active_run().info.run_id, logged.model_id,
                 list(dataclasses.asdict(final.state.best_row())),
                 report.best_epoch or report.epochs_run)
    return logged.model_uri, logged.model_id


def final_test_metrics(final: FinalCheckpoint) -> dict[str, float]:
    """The run's test loss, accuracy and AUC (those that are finite)."""
    t = final.report.test
    return {f"test_{k}": v for k, v in (("loss", t.loss), ("acc", t.acc), ("auc", t.auc))
            if np.isfinite(v)}


def evaluate_logged(cfg, info: DatasetInfo, model_uri: str, model_id: str) -> None:
    """`mlflow.models.evaluate` of a logged model on the active run (as `tracking.evaluate`
    says), and the tag that says what it did."""
    import mlflow

    mlflow.set_tag("mlflow_evaluate", logged_model.evaluate(
        model_uri, model_id, info, cfg.data.image_size, cfg.tracking.evaluate))


def trained_network(cfg, info: DatasetInfo, final: FinalCheckpoint) -> tuple[torch.nn.Module,
                                                                             ModelInfo]:
    """The run's architecture with the final checkpoint's (best) weights, and what the
    model wants as input: built without its starting weights, which the checkpoint replaces
    entirely."""
    depth = schedule.parse(cfg.model.freeze)[final.state.phase].depth  # as the weights were
    model, minfo = build_for_run(cfg, info, weights="none", freeze=depth)
    model.load_state_dict(torch.load(final.weights, map_location="cpu", weights_only=True))
    return model, minfo


def model_example_images(info: DatasetInfo) -> np.ndarray:
    """Two real validation images as the dataset stores them: the logged model's example."""
    images, _ = sample_per_class(info, "val", per_class=1)
    return images[:2].copy()
