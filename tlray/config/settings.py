"""Every setting of a run: one dataclass per concern, each field with its default and help.

The help text of each field (`setting(default, "help")`) is what `tlray train --help` prints,
grouped by section; a field's `choices` are what validation accepts. One list: adding a field
here adds it to YAML configs, `--section.key=value`, `--help` and MLflow's logged params.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tlray.config.augmentation import AUTO, PRESETS
from tlray.config.workers import worker_range

# Metrics every epoch reports; the value is the direction in which they improve.
MONITORS = {"val_loss": "min", "val_acc": "max", "val_auc": "max", "train_loss": "min"}
CHAMPION_METRICS = {"test_acc": "max", "test_auc": "max", "test_loss": "min"}


def setting(default: Any, help: str, *, choices: tuple | None = None,
            factory: Any = None) -> Any:
    """A dataclass field that carries its one-line help (and allowed values) as metadata."""
    meta = {"help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """What to train on, and at which input size."""

    dataset: str = setting("builtin:mnist", "a prepared dataset, or a source to prepare first")
    image_size: int = setting(32, "model input side in px; batches are resized on the device")
    batch_size: int = setting(64, "images per batch, per worker")
    shuffle: bool = setting(True, "train rows in a new order every epoch, within and across "
                                  "shards")
    cache_gb: float = setting(2.0, "splits up to this size are read once into Ray's object "
                                   "store")
    augment: str = setting("none", "training-time augmentation preset (auto: chosen from "
                                   "the data when the run starts, and said why)",
                           choices=(AUTO, *PRESETS))
    augment_rotate: float | None = setting(None, "rotation in degrees, +- (empty: the "
                                                 "preset's)")
    augment_shift: float | None = setting(None, "shift as a fraction of the side, +-")
    augment_scale: float | None = setting(None, "zoom 1 -+ this")
    augment_crop: float | None = setting(None, "random resized crop: least area fraction "
                                               "(0: none)")
    augment_hflip: bool | None = setting(None, "mirror half the images left-right")
    augment_dihedral: bool | None = setting(None, "one of the 8 flips / quarter turns")


@dataclass
class ModelConfig:
    """The backbone, its starting weights, its head and how much of it stays frozen."""

    backbone: str = setting("tf_efficientnet_lite0", "a timm model name, or scratch_cnn")
    weights: str = setting("packaged", "packaged | timm | none | file:PATH | "
                                       "models:/NAME@ALIAS | runs:/ID/model")
    head: str = setting("linear", "the new head: linear, or mlp (dense 256/128, as the "
                                  "malaria original)", choices=("linear", "mlp"))
    head_init: str = setting("timm", "the new head's output layer starts as the model's own "
                                     "init (timm) or at zero (zero: as BiT, from a loss of "
                                     "ln(classes))", choices=("timm", "zero"))
    freeze: str = setting("0", "coarse groups frozen from the stem (0 .. N, or all: head "
                              "only; see `tlray models describe`), or a schedule of phases "
                              "DEPTH:EPOCHS@LR_SCALE, e.g. all:1,0@0.5")
    drop_rate: float = setting(0.0, "dropout before the classifier")
    tta: str = setting("none", "test-time augmentation of the test split and the served "
                               "model: none, flip (2 views), dihedral (8)",
                       choices=("none", "flip", "dihedral"))


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (created through timm)."""

    name: str = setting("adamw", "optimizer", choices=("adam", "adamw", "nadam", "sgd"))
    lr: float = setting(1e-3, "peak learning rate")
    weight_decay: float = setting(0.01, "weight decay (not on norms and biases)")
    momentum: float = setting(0.9, "SGD momentum")
    schedule: str = setting("cosine", "learning-rate schedule: cosine annealing, or constant",
                            choices=("cosine", "constant"))
    warmup_epochs: float = setting(0.0, "linear warm-up from 1% of lr, in epochs")
    min_lr: float = setting(1e-6, "where the cosine schedule ends")
    label_smoothing: float = setting(0.0, "cross-entropy label smoothing")
    layer_decay: float | None = setting(None, "e.g. 0.75: earlier layers learn more slowly")


@dataclass
class TrainConfig:
    """The epoch loop: length, early stopping, checkpoints, speed switches."""

    epochs: int = setting(5, "epochs to train")
    patience: int | None = setting(None, "stop after this many epochs without improvement")
    monitor: str = setting("val_loss", "the metric that picks the best epoch",
                           choices=tuple(MONITORS))
    keep_checkpoints: int = setting(2, "checkpoints kept, best first by the monitor")
    checkpoint_every: str = setting("0", "also checkpoint inside an epoch, every N steps "
                                         "(200), minutes (10m) or seconds (90s), so a crash "
                                         "costs at most that much; 0: at epoch ends only")
    seed: int = setting(42, "initial weights, data order, augmentation: a one-worker run "
                            "repeats exactly")
    amp: bool = setting(True, "bf16 autocast on CUDA (ignored on a CPU)")
    channels_last: bool = setting(True, "NHWC memory: faster convolutions")
    compile: bool = setting(False, "torch.compile the model, once per run")
    ema: float | None = setting(None, "average the weights (decay, e.g. 0.999, warmed up): "
                                      "validation, the best checkpoint, the test and the "
                                      "logged model use the average")
    # YAML reads on/off as booleans, hence the words.
    feature_cache: str = setting("auto", "train a frozen front from its cached outputs: auto "
                                         "(when they are small), always, never",
                                 choices=("auto", "always", "never"))


@dataclass
class ScalingConfig:
    """How many Train workers, on what."""

    num_workers: int | str = setting(1, "data-parallel Train workers, or a range MIN-MAX "
                                        "(1-4): starts once MIN fit, grows when nodes "
                                        "join, goes on with fewer when one is lost")
    use_gpu: bool = setting(False, "one GPU (or gpus_per_worker) per worker")
    cpus_per_worker: float = setting(1.0, "CPUs each worker reserves; fractions work (0.5)")
    gpus_per_worker: float | None = setting(None, "GPUs each worker reserves; fractions share "
                                                  "one (empty: a whole GPU, or a sweep's "
                                                  "one-worker trials' share, "
                                                  "tune.trials_per_gpu)")
    max_failures: int = setting(1, "worker failures a run survives by resuming from its "
                                   "checkpoint (-1: no limit)")
    max_preemptions: int = setting(-1, "node preemptions (a drain notice, e.g. a spot "
                                       "reclaim) a run survives, counted apart from failures "
                                       "(-1: no limit)")
    notice_check_every: int = setting(10, "steps between checks for a preemption notice, "
                                          "which triggers a checkpoint at once")
    grow_check_every: float = setting(60.0, "seconds between an elastic run's looks for room "
                                            "to grow; growing restarts the workers from "
                                            "the latest checkpoint")
    placement_strategy: str = setting("PACK", "where workers go: PACK, SPREAD, STRICT_SPREAD "
                                              "(one per node)",
                                      choices=("PACK", "SPREAD", "STRICT_PACK",
                                               "STRICT_SPREAD"))
    borrow_idle_cpus: bool = setting(True, "a one-worker CPU run also computes on CPUs "
                                           "nobody holds (re-counted every epoch)")
    in_driver_process: bool = setting(True, "a one-worker CPU run on a one-node cluster "
                                            "trains in the command's own process (no Train "
                                            "controller or worker to start: ~10 s sooner)")

    @property
    def gpus(self) -> float:
        """What each worker reserves of a GPU (with `use_gpu`)."""
        return 1.0 if self.gpus_per_worker is None else self.gpus_per_worker

    @property
    def min_workers(self) -> int:
        return worker_range(self.num_workers)[0]

    @property
    def max_workers(self) -> int:
        return worker_range(self.num_workers)[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers


@dataclass
class TrackingConfig:
    """MLflow: where runs go and what is logged."""

    experiment: str | None = setting(None, "experiment name (default: tlray-<dataset>)")
    tracking_uri: str | None = setting(None, "default: MLFLOW_TRACKING_URI, else "
                                             "$TLRAY_HOME/mlflow.db")
    run_name: str | None = setting(None, "MLflow run name")
    log_model: bool = setting(True, "log the best model (a pyfunc that takes raw images)")
    evaluate: str = setting("auto", "mlflow.models.evaluate on the test split: auto (when it "
                                    "takes seconds), always, never",
                            choices=("auto", "always", "never"))


@dataclass
class TuneConfig:
    """The sweep (`tlray tune`): what to search, how many trials, how to stop bad ones early."""

    num_samples: int = setting(4, "trials")
    budget: str | None = setting(None, "end the sweep within this time (90s, 2m, 20m, 1h30m, "
                                       "4h or seconds): trials, epochs, ASHA's rungs, trials "
                                       "at once and the feature cache are planned to fit; an "
                                       "explicit num_samples or train.epochs still wins "
                                       "(empty: no budget)")
    lr_min: float | str = setting(1e-4, "learning rate range, log-uniform: low end (auto: "
                                        "from a learning-rate range test, `tlray lr-find`)")
    lr_max: float | str = setting(1e-2, "learning rate range: high end (auto: from lr-find)")
    freeze: str = setting("auto", "freeze depths (or schedules) to try, e.g. 0,3,all or "
                                  "0;all:1,0@0.5 (auto: every depth)")
    space: dict | None = setting(None, "more fields: {optim.weight_decay: [0, 0.05]} or "
                                       "{optim.label_smoothing: {uniform: [0, 0.2]}}")
    search: str = setting("stratified", "stratified (lr x freeze covered evenly), random, "
                                        "optuna (TPE)",
                          choices=("stratified", "random", "optuna"))
    seed: int | None = setting(42, "the same seed samples the same trials (empty: new draw)")
    grace_period: int = setting(2, "ASHA: epochs every trial gets before it can be stopped "
                                   "(>= train.epochs: none is)")
    reduction_factor: int = setting(2, "ASHA: keep the best 1/this at each rung")
    max_concurrent: int = setting(0, "trials at once (0: as many as the cluster holds)")
    trials_per_gpu: int = setting(0, "one-worker trials sharing a GPU (0: 4 up to 64 px, 2 "
                                     "up to 128 px, else 1)")
    max_failures: int = setting(1, "retries of a failed trial, from its last checkpoint")
    in_trial_process: bool = setting(True, "one-worker trials train in the Tune trial's own "
                                           "process (no Train worker group to start)")
    name: str | None = setting(None, "the sweep's name in Ray storage (default: "
                                     "dataset-backbone-time)")
    registered_name: str | None = setting(None, "registry name (default: dataset-backbone)")
    log_models: str = setting("pick", "whose model the sweep logs: pick (the trial it "
                                      "picks, once the sweep ends) or all (every completed "
                                      "trial's, ~3-4 s of export each, to choose another "
                                      "one in the MLflow UI)",
                              choices=("pick", "all"))
    champion_metric: str = setting("test_acc", "what @champion must beat",
                                   choices=tuple(CHAMPION_METRICS))
    goal: float | None = setting(None, "stop the sweep once a trial's train.monitor reaches "
                                       "this (e.g. 0.99): running trials finish their epoch, "
                                       "no new one starts")


@dataclass
class Config:
    """A whole run's settings."""

    data: DataConfig = setting(None, "", factory=DataConfig)
    model: ModelConfig = setting(None, "", factory=ModelConfig)
    optim: OptimConfig = setting(None, "", factory=OptimConfig)
    train: TrainConfig = setting(None, "", factory=TrainConfig)
    scaling: ScalingConfig = setting(None, "", factory=ScalingConfig)
    tracking: TrackingConfig = setting(None, "", factory=TrackingConfig)
    tune: TuneConfig = setting(None, "", factory=TuneConfig)
    storage_path: str | None = setting(None, "Ray results and checkpoints; shared storage "
                                             "(s3://, NFS) on a cluster")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def monitor_mode(self) -> str:
        return MONITORS[self.train.monitor]


def sections() -> dict[str, type | None]:
    """Section name -> its dataclass (None for a top-level scalar such as storage_path)."""
    out = {}
    for f in dataclasses.fields(Config):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        out[f.name] = type(default) if dataclasses.is_dataclass(default) else None
    return out


def all_settings() -> list[tuple[str, dataclasses.Field, Any]]:
    """(`section.key`, field, default) for every setting, in declaration order."""
    out = []
    for name, section in sections().items():
        if section is None:
            f = next(f for f in dataclasses.fields(Config) if f.name == name)
            out.append((name, f, f.default))
            continue
        for f in dataclasses.fields(section):
            out.append((f"{name}.{f.name}", f, f.default))
    return out
