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
from tlray.model.build import build_for_run
from tlray.serve import log_model as logged_model
from tlray.track import plots
from tlray.track.figures import log_figure
from tlray.track.run_metrics import link_metrics
from tlray.train.checkpoint import FinalCheckpoint
from tlray.train.plan import Plan

EVALUATED_BY_THE_SWEEP = "not run here: the sweep runs it on the trial it picks"


def log_final(final: FinalCheckpoint, plan: Plan, test_data, *,
              evaluate: bool = True) -> str | None:
    """Logs `final` to the active MLflow run; returns the logged model's URI (None if the
    config says not to log it).

    The logged model gets the best epoch's validation metrics and the test metrics (which
    are also linked to the test split, `test_data`). `evaluate=False` (a sweep's trial)
    leaves `mlflow.models.evaluate` to the caller, which runs it on the model it picks.
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
    model_uri = model_id = None
    if "tta" in test:
        t = test["tta"]
        mlflow.log_metrics({"test_acc_without_tta": t["acc_without_tta"],
                            "test_ms_per_image": t["ms_per_image"],
                            "test_ms_per_image_without_tta": t["ms_per_image_without_tta"]})
    if cfg.tracking.log_model:
        logged = logged_model.log_model(
            trained_network(plan, final), model_example_images(info), info.classes,
            {"mean": plan.model.data_config["mean"], "std": plan.model.data_config["std"],
             "size": [cfg.data.image_size] * 2, "channels": info.channels,
             "tta": cfg.model.tta})
        model_uri, model_id = logged.model_uri, logged.model_id
        mlflow.set_tag("model_uri", model_uri)
        # The best epoch's metrics go with the model: its weights are that epoch's.
        link_metrics(mlflow.active_run().info.run_id, model_id,
                     list(dataclasses.asdict(final.state.best_row())),
                     report.best_epoch or report.epochs_run)
    test_metrics = {f"test_{k}": v for k, v in (("loss", report.test.loss),
                                                ("acc", report.test.acc),
                                                ("auc", report.test.auc)) if np.isfinite(v)}
    mlflow.log_metrics(test_metrics, step=report.epochs_run, model_id=model_id,
                       dataset=test_data)
    if model_uri is not None and (evaluate or cfg.tracking.evaluate == "never"):
        evaluate_logged(cfg, info, model_uri, model_id)
    elif model_uri is not None:
        mlflow.set_tag("mlflow_evaluate", EVALUATED_BY_THE_SWEEP)
    return model_uri


def evaluate_logged(cfg, info: DatasetInfo, model_uri: str, model_id: str) -> None:
    """`mlflow.models.evaluate` of a logged model on the active run (as `tracking.evaluate`
    says), and the tag that says what it did."""
    import mlflow

    mlflow.set_tag("mlflow_evaluate", logged_model.evaluate(
        model_uri, model_id, info, cfg.data.image_size, cfg.tracking.evaluate))


def trained_network(plan: Plan, final: FinalCheckpoint) -> torch.nn.Module:
    """The run's architecture with the final checkpoint's (best) weights: built without its
    starting weights, which the checkpoint replaces entirely."""
    cfg, info = plan.config, plan.dataset
    depth = schedule.parse(cfg.model.freeze)[final.state.phase].depth  # as the weights were
    model, _ = build_for_run(cfg, info, weights="none", freeze=depth)
    model.load_state_dict(torch.load(final.weights, map_location="cpu", weights_only=True))
    return model


def model_example_images(info: DatasetInfo) -> np.ndarray:
    """Two real validation images as the dataset stores them: the logged model's example."""
    images, _ = sample_per_class(info, "val", per_class=1)
    return images[:2].copy()
