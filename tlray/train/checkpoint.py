"""A run's checkpoints, written and read here and nowhere else.

Two kinds, both directories that Ray Train or Tune persist:

- a training checkpoint, after every epoch (and inside one, see `tlray.train.position`):
  the model, the optimizer and schedule, the weight average, the best weights so far and
  `TrainingState`; a run restarted after a failure resumes from it exactly (the data order
  and every random draw follow from (seed, epoch, step), see `tlray.train.feeds`);
- the final checkpoint, once training is over: the best weights, the state, the final
  `Report`, the test details and every test row's probabilities (`test_predictions.csv`).
  A run restarted from it (a trial killed while its model was being logged) only re-runs
  the test.

Checkpoints of tlray before format 2 cannot be resumed: their runs start over.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tlray.errors import TlrayError
from tlray.serve.columns import probability_columns
from tlray.track import metrics
from tlray.track.metrics import is_better, reaches
from tlray.train.protocol import EpochMetrics, Report

FORMAT = 2
TEST_PREDICTIONS = "test_predictions.csv"  # every test row: id, label, class, prob_<class>
_STATE, _MODEL, _BEST, _OPTIMIZER, _SCHEDULER, _EMA = (
    "state.json", "model.pt", "best_model.pt", "optimizer.pt", "scheduler.pt", "ema.pt")
_REPORT, _TEST, _SAMPLES = "report.json", "test.json", "test_samples.npz"


@dataclass
class TrainingState:
    """Where a run stands, besides tensors."""

    epoch: int = 0  # epochs done; the next one to run is epoch + 1
    step: int = 0  # optimizer steps so far
    best_value: float | None = None  # of the monitored metric
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the monitored metric last improved
    history: list[dict] = field(default_factory=list)  # EpochMetrics as dicts, in order
    stopped_early: bool = False
    goal_reached: bool = False  # stopped early because the monitored metric reached tune.goal
    resumed: int = 0  # times this run was restored from a checkpoint after a failure
    resumed_at: list[int] = field(default_factory=list)  # the global step of each restore
    trained: bool = False  # every epoch done (the final checkpoint): only the test remains
    phase: int = 0  # the schedule's phase model.pt is frozen as (the last epoch's; the best's
    #                 in the final checkpoint)
    phase_start_step: int = 0  # the global step that phase started after
    best_phase: int = 0  # the phase of the best epoch: how its weights were frozen
    position: dict | None = None  # written inside an epoch: `tlray.train.position.Position`
    preemptions: int = 0  # preemption notices this run has had
    world: int = 0  # workers when it was written (an elastic run may resume with others)
    run_id: str | None = None  # the MLflow run it was written for (a resumed sweep's
    #                            trial starts a new run)

    def record(self, row: EpochMetrics, monitor: str, mode: str, patience: int | None,
               epochs: int, goal: float | None = None) -> bool:
        """Adds a finished epoch; returns whether it is the best so far by `monitor`.

        The run stops early after `patience` epochs without improvement, or once the
        monitored metric reaches `goal` (a sweep's `tune.goal`)."""
        self.history.append(dataclasses.asdict(row))
        self.epoch = row.epoch
        value = getattr(row, monitor)
        improved = is_better(value, self.best_value, mode)
        if improved:
            self.best_value, self.best_epoch, self.bad_epochs = value, row.epoch, 0
        else:
            self.bad_epochs += 1
        self.goal_reached = reaches(value, goal, mode) and self.epoch < epochs
        self.stopped_early = self.goal_reached or bool(
            patience and self.bad_epochs >= patience and self.epoch < epochs)
        return improved

    def best_row(self) -> EpochMetrics:
        row = self.history[self.best_epoch - 1] if self.best_epoch else self.history[-1]
        return EpochMetrics(**row)


@dataclass
class FinalCheckpoint:
    """What the driver logs once a run is over."""

    directory: Path
    state: TrainingState
    report: Report
    test: dict  # loss, acc, auc, rows, classes, confusion_matrix, per_class_acc
    samples: dict | None  # a few test images with labels and predictions, for the grid

    @property
    def weights(self) -> Path:
        return self.directory / _MODEL

    @property
    def predictions(self) -> Path:
        return self.directory / TEST_PREDICTIONS


def save_training(d: Path, model, optimizer, scheduler, state: TrainingState,
                  best_weights: dict | None, ema=None) -> None:
    torch.save(model.state_dict(), d / _MODEL)
    if ema is not None:  # the running average goes on where it stopped
        torch.save(ema.module.state_dict(), d / _EMA)
    torch.save(optimizer.state_dict(), d / _OPTIMIZER)
    if scheduler is not None:
        torch.save(scheduler.state_dict(), d / _SCHEDULER)
    if best_weights is not None and (state.best_epoch != state.epoch or state.position):
        torch.save(best_weights, d / _BEST)
    _write_state(d, state)


def peek(found) -> TrainingState | None:
    """The state a checkpoint (Ray's) was saved in, before anything is loaded from it: the
    model must be frozen as that epoch's phase froze it first. None without a checkpoint."""
    if found is None:
        return None
    with found.as_directory() as d:
        return _read_state(Path(d))


def load_training(d: Path, model, optimizer, scheduler, ema=None
                  ) -> tuple[TrainingState, dict]:
    """Restores model, optimizer, schedule, weight average and state in place; returns
    (state, best weights).

    From the final checkpoint the model gets the best weights and nothing else is restored:
    training is over, the test remains.
    """
    state = _read_state(d)
    model.load_state_dict(_load(d / _MODEL))
    if state.trained:
        return state, {k: v.detach().clone() for k, v in model.state_dict().items()}
    if ema is not None and (d / _EMA).exists():
        ema.module.load_state_dict(_load(d / _EMA))
    optimizer.load_state_dict(_load(d / _OPTIMIZER))
    if scheduler is not None and (d / _SCHEDULER).exists():
        scheduler.load_state_dict(_load(d / _SCHEDULER))
    best = _load(d / _BEST) if (d / _BEST).exists() else _load(d / _MODEL)
    return state, best


def save_final(d: Path, model, state: TrainingState, report: Report, test, classes: list[str],
               tta: dict | None = None) -> None:
    """The final checkpoint. `test` is the test split's `tlray.train.steps.Evaluation`;
    `tta` what test-time augmentation bought and cost (accuracy and ms per image without)."""
    torch.save(model.state_dict(), d / _MODEL)
    _write_state(d, state)
    (d / _REPORT).write_text(json.dumps(report.metrics()))
    cm = test.confusion
    (d / _TEST).write_text(json.dumps({
        "loss": test.loss, "acc": test.acc, "auc": test.auc, "rows": test.rows,
        "classes": classes, "confusion_matrix": cm.tolist(),
        "per_class_acc": dict(zip(classes, metrics.per_class_accuracy(cm).tolist())),
        **({"tta": tta} if tta else {})}))
    ids, labels, probs = test.predictions
    table = {"id": ids, "label": [classes[i] for i in labels],
             "class": [classes[i] for i in probs.argmax(1)],
             **dict(zip(probability_columns(classes), probs.T))}
    pd.DataFrame(table).to_csv(d / TEST_PREDICTIONS, index=False, float_format="%.9g")
    images, labels, preds = test.samples
    if images is not None:
        np.savez(d / _SAMPLES, images=images, labels=labels, preds=preds)


def read_final(d: Path, monitor: str) -> FinalCheckpoint:
    d = Path(d)
    state = _read_state(d)
    if not state.trained:
        raise RuntimeError(f"{d} is a training checkpoint, not a run's final checkpoint")
    samples = None
    if (d / _SAMPLES).exists():
        with np.load(d / _SAMPLES, allow_pickle=False) as npz:
            samples = {k: npz[k] for k in ("images", "labels", "preds")}
    return FinalCheckpoint(directory=d, state=state,
                           report=Report.from_metrics(json.loads((d / _REPORT).read_text()),
                                                      monitor),
                           test=json.loads((d / _TEST).read_text()), samples=samples)


def _write_state(d: Path, state: TrainingState) -> None:
    (d / _STATE).write_text(json.dumps({"format": FORMAT, **dataclasses.asdict(state)}))


def _read_state(d: Path) -> TrainingState:
    values = json.loads((d / _STATE).read_text())
    if values.pop("format", None) != FORMAT:
        raise TlrayError(f"checkpoint {d} was written by an older tlray and cannot be resumed; "
                         f"start the run (or sweep) again")
    return TrainingState(**values)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
