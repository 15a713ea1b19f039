"""The contract between a run's driver and its Train workers, typed.

The driver hands every worker one `WorkerArgs` (resolved once by the preflight,
`tlray.train.plan`). Every worker reports one `Report` per epoch to Ray and, when training
is over, one more with the test results and `final=True`: that flag, not the presence of a
metric, is how the driver, Tune and the sweep tell the final report apart. Reports travel
as flat dicts (Ray's format); `Report.metrics()` and `Report.from_metrics()` convert, here
and nowhere else. The checkpoint files are `tlray.train.checkpoint`'s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tlray.config import Config
from tlray.data.dataset import DatasetInfo
from tlray.train.deadline import Deadline


@dataclass(frozen=True)
class CachePlan:
    """The frozen-front feature cache a run reads (built by the preflight), and for what."""

    uri: str
    cut: str  # the last module of the frozen front, e.g. "blocks.1" or "global_pool"
    shape: tuple[int, ...]  # the front's output for one image, e.g. (24, 12, 12)
    splits: tuple[str, ...]  # ("train", "val"), or ("val",) when training images are augmented
    reason: str  # what is cached and why, said on the console and tagged on the MLflow run

    @property
    def trains_on_cache(self) -> bool:
        return "train" in self.splits


def cache_dataset(split: str) -> str:
    """The name under which a split of the feature cache reaches the workers."""
    return f"cache:{split}"


def dataset_names(cache: CachePlan | None, phases: int) -> list[str]:
    """The datasets a run's workers read: the cache's splits, and the image splits that some
    phase reads (all of them but those the cache serves in a one-phase run)."""
    cached = list(cache.splits) if cache else []
    images = [s for s in ("train", "val", "test") if phases > 1 or s not in cached]
    return [cache_dataset(s) for s in cached] + images


@dataclass(frozen=True)
class WorkerArgs:
    """Everything a worker is given; nothing in it is re-derived by the worker."""

    config: Config  # resolved: absolute dataset URI, storage path and tracking URI
    dataset: DatasetInfo
    cache: CachePlan | None
    run_id: str | None  # the MLflow run rank 0 logs every epoch to
    tracking_uri: str | None
    label: str | None = None  # a sweep trial's name, before each of its console lines
    interactive: bool = False  # stdout is a terminal: rank 0 shows a progress bar
    in_trial_process: bool = False  # the loop runs inside a Tune trial and reports to Tune
    restart_key: str = ""  # names the run across worker restarts (for test-only faults)
    goal: float | None = None  # a sweep trial stops once train.monitor reaches it (tune.goal)
    deadline: Deadline | None = None  # a budgeted sweep's trial ends its training in time
    fault: str | None = None  # test-only: see tlray.train.faults


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch's figures, reduced over every worker: one row of the history."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    val_auc: float
    lr: float
    img_per_s: float
    epoch_seconds: float


@dataclass(frozen=True)
class TestMetrics:
    """The best weights on the test split (by the whole model, on images)."""

    __test__ = False  # not a pytest class

    loss: float
    acc: float
    auc: float
    rows: int


@dataclass(frozen=True)
class Report:
    """What one report to Ray says. An epoch report carries that epoch's figures; the final
    report carries the best epoch's, the test results and how training ended."""

    epoch: EpochMetrics
    monitor: str
    best_epoch: int | None
    best_value: float | None
    final: bool = False
    test: TestMetrics | None = None
    stopped_early: bool = False
    epochs_run: int = 0
    epochs_seconds: float = 0.0  # the epochs' wall time, train + validation

    def metrics(self) -> dict[str, float | int | bool | None]:
        """The flat dict Ray, Tune and MLflow take."""
        out = {**dataclasses.asdict(self.epoch), "best_epoch": self.best_epoch,
               f"best_{self.monitor}": self.best_value, "final": self.final}
        if self.final:
            out.update(stopped_early=self.stopped_early, epochs_run=self.epochs_run,
                       epochs_seconds=self.epochs_seconds)
            if self.test is not None:
                out.update({f"test_{k}": v for k, v in dataclasses.asdict(self.test).items()})
        return out

    @staticmethod
    def partial(state, monitor: str, mode: str) -> dict:
        """What a checkpoint written inside an epoch reports: no epoch's figures, the
        monitored metric at its worst (so that Ray keeps it only while it is the latest);
        `epoch` is the epochs done. Schedulers, clocks and pickers skip it (`is_partial`)."""
        return {"partial": True, "epoch": state.epoch, "step": state.step,
                "best_epoch": state.best_epoch, f"best_{monitor}": state.best_value,
                monitor: -math.inf if mode == "max" else math.inf, "final": False}

    @classmethod
    def from_metrics(cls, metrics: dict, monitor: str) -> Report:
        """The report back from Ray's flat dict (a Tune result, a Train result)."""
        epoch = EpochMetrics(**{f.name: metrics[f.name]
                                for f in dataclasses.fields(EpochMetrics)})
        final = bool(metrics.get("final", False))
        test = None
        if final and "test_acc" in metrics:
            test = TestMetrics(loss=metrics["test_loss"], acc=metrics["test_acc"],
                               auc=metrics["test_auc"], rows=int(metrics.get("test_rows", 0)))
        return cls(epoch=epoch, monitor=monitor, best_epoch=metrics.get("best_epoch"),
                   best_value=metrics.get(f"best_{monitor}"), final=final, test=test,
                   stopped_early=bool(metrics.get("stopped_early", False)),
                   epochs_run=int(metrics.get("epochs_run", epoch.epoch)),
                   epochs_seconds=float(metrics.get("epochs_seconds", math.nan)))


def is_partial(metrics: dict) -> bool:
    """Whether a result is a checkpoint's from inside an epoch (`Report.partial`)."""
    return bool(metrics.get("partial", False))


def is_final(metrics: dict) -> bool:
    """Whether a result from Ray is a run's final report (tested, training over)."""
    return bool(metrics.get("final", False))
