"""Run configuration: one dataclass per concern, a YAML file, and `--section.key=value` overrides.

Every default lives here, in one place. A config is resolved (file, then overrides), validated
before any cluster resource is taken, and saved with the run (MLflow `config.yaml`), so the
exact same run can be started again with `--config config.yaml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tlray.errors import TlrayError

OPTIMIZERS = ("adam", "adamw", "nadam", "sgd")
SCHEDULES = ("cosine", "constant")
HEADS = ("linear", "mlp")
# Metrics every epoch reports; the second item is the direction in which they improve.
MONITORS = {"val_loss": "min", "val_acc": "max", "val_auc": "max", "train_loss": "min"}
FEATURE_CACHE_MODES = ("auto", "always", "never")
SEARCHES = ("stratified", "random", "optuna")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
EVALUATE_MODES = ("auto", "always", "never")
CHAMPION_METRICS = {"test_acc": "max", "test_auc": "max", "test_loss": "min"}


@dataclass
class DataConfig:
    """What to train on, and at which input size."""

    dataset: str = "builtin:mnist"  # a prepared dataset, or a source to prepare first
    image_size: int = 32  # model input (square); batches are resized on the device
    batch_size: int = 64  # per worker
    shuffle: bool = True  # train rows in a new order every epoch, within and across shards
    cache_gb: float = 2.0  # splits up to this size are read once into Ray's object store
    # Training-time augmentation (tlray/augment.py): none | digits | natural | microscopy.
    # The augment_* fields override the preset's values (None: the preset's).
    augment: str = "none"
    augment_rotate: float | None = None  # degrees, +-
    augment_shift: float | None = None  # fraction of the side, +-
    augment_scale: float | None = None  # zoom 1 -+ this
    augment_crop: float | None = None  # random resized crop: least area fraction (0: none)
    augment_hflip: bool | None = None  # mirror half the images
    augment_dihedral: bool | None = None  # one of the 8 flips / quarter turns


@dataclass
class ModelConfig:
    """The backbone, its starting weights, its head and how much of it stays frozen."""

    backbone: str = "tf_efficientnet_lite0"
    weights: str = "packaged"  # packaged | timm | none | file:PATH | models:/NAME@ALIAS | runs:/...
    head: str = "linear"  # linear | mlp (the malaria original's dense 256/128 head)
    freeze: str = "0"  # coarse groups frozen from the stem: 0 .. N, or "all" (head only)
    drop_rate: float = 0.0


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (created through timm)."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9  # SGD only
    schedule: str = "cosine"  # cosine (annealing, as in the MNIST original) | constant
    warmup_epochs: float = 0.0
    min_lr: float = 1e-6
    label_smoothing: float = 0.0
    layer_decay: float | None = None  # e.g. 0.75: earlier layers learn more slowly


@dataclass
class TrainConfig:
    """The epoch loop: length, early stopping, checkpoints, speed switches."""

    epochs: int = 5
    patience: int | None = None  # stop after this many epochs without improvement
    monitor: str = "val_loss"
    keep_checkpoints: int = 2  # best N by `monitor`
    seed: int = 42  # initial weights, block order, row shuffle: a one-worker run repeats exactly
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # NHWC memory: faster convolutions on GPUs and on CPUs
    compile: bool = False  # torch.compile, once per run
    # Frozen-backbone feature cache (tlray.features): "auto" caches the frozen front's outputs
    # when they are at most 4x the input's size and those of train + val fit in
    # data.cache_gb; "always"; "never" (YAML reads on/off as booleans, hence the words).
    feature_cache: str = "auto"
    # Test-only: the worker of this rank kills itself (SIGKILL) at this global step, once per
    # run, to prove that recovery from the last checkpoint works.
    kill_rank: int = -1
    kill_at_step: int = -1


@dataclass
class ScalingConfig:
    """How many Train workers, on what."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # fractions work: 2 workers on a 2-core laptop use 0.5 each
    gpus_per_worker: float = 1.0
    max_failures: int = 1  # worker failures a run survives by resuming from its checkpoint
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_SPREAD (one worker per node)
    # A one-worker CPU run on a one-node cluster also computes on CPUs nobody holds, re-counted
    # every epoch (tlray.threads): the last trial of a sweep uses the whole laptop.
    borrow_idle_cpus: bool = True


@dataclass
class TrackingConfig:
    """MLflow: where runs go and what is logged."""

    experiment: str | None = None  # default: "tlray-<dataset name>"
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI or $TLRAY_HOME/mlflow.db
    run_name: str | None = None
    log_model: bool = True
    # mlflow.models.evaluate of the logged model on the test split (its confusion matrix and
    # per-class metrics in the UI): auto runs it when the split is small enough to take
    # seconds on a CPU (it runs in the driver), always, or never.
    evaluate: str = "auto"


@dataclass
class TuneConfig:
    """The sweep (`tlray tune`): what to search, how many trials, how to stop bad ones early."""

    num_samples: int = 4
    lr_min: float = 1e-4  # learning rate, log-uniform in [lr_min, lr_max]
    lr_max: float = 1e-2
    freeze: str = "auto"  # depths to try, e.g. "0,3,all"; auto: every depth from 0 to all
    space: dict | None = None  # more fields, e.g. {"optim.weight_decay": [0, 0.05]} (a choice)
    #                            or {"optim.label_smoothing": {"uniform": [0, 0.2]}}
    # stratified: lr x freeze depth covered evenly (a Latin hypercube; other tune.space fields
    # at random) | random | optuna (TPE; needs the optuna package)
    search: str = "stratified"
    seed: int | None = 42  # the same seed samples the same trials (None: a new draw each time)
    # ASHA: epochs every trial gets before it can be stopped. A first epoch says little of
    # where fine-tuning ends; on the main job (`tlray benchmark sweep --regret`) a grace of
    # 1 left one validation image of 500 on the table, 2 none, in 1.12x the time.
    grace_period: int = 2
    reduction_factor: int = 2
    max_concurrent: int = 0  # 0: as many trials as the cluster's CPUs/GPUs hold at once
    # One-worker trials sharing a GPU (small inputs leave most of one idle: launch-bound).
    # 0: from the input size, 4 up to 64 px, 2 up to 128 px, else 1.
    trials_per_gpu: int = 0
    max_failures: int = 1  # retries of a failed trial (from its last checkpoint)
    # One-worker trials train inside the Tune trial's own process (Ray Train's local mode):
    # no Train controller and worker processes to start, ~10 s less per trial on a laptop.
    # false: every trial runs a Ray Train worker group (Train restarts a dead worker).
    in_process: bool = True
    name: str | None = None  # the sweep's name in Ray storage (default: dataset-backbone-time)
    registered_name: str | None = None  # registry name (default: dataset and backbone)
    champion_metric: str = "test_acc"  # test_acc | test_auc | test_loss


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    storage_path: str | None = None  # Ray results; shared storage (s3://, NFS) on a cluster

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def monitor_mode(self) -> str:
        return MONITORS[self.train.monitor]


def from_dict(values: dict[str, Any] | None, base: Config | None = None) -> Config:
    """A Config from nested dicts (e.g. parsed YAML); unknown keys are an error."""
    config = _copy(base) if base else Config()
    for key, value in (values or {}).items():
        _set(config, key, value, origin="config")
    return config


def load(path: str | Path | None = None, overrides: list[str] | None = None,
         base: Config | None = None) -> Config:
    """Resolves a config: defaults (or `base`), then a YAML file, then `section.key=value`s."""
    config = _copy(base) if base else Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise TlrayError(f"--config {path}: no such file")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise TlrayError(f"--config {path}: not valid YAML ({e})") from None
        if not isinstance(values, dict):
            raise TlrayError(f"--config {path}: expected a mapping of sections")
        config = from_dict(values, config)
    for item in overrides or []:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep:
            raise TlrayError(f"override {item!r}: expected --section.key=value")
        _set(config, key, _parse_value(value), origin="override")
    validate(config)
    return config


def _parse_value(text: str) -> Any:
    """A YAML scalar/list/mapping (`3e-4`, `true`, `[0, 1]`), else the text itself (`0,3,all`)."""
    if text == "":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def validate(config: Config) -> Config:
    """Checks values that types alone do not catch, before any resource is reserved."""
    d, m, o, t, s, u = (config.data, config.model, config.optim, config.train, config.scaling,
                        config.tune)
    checks = [
        (d.image_size >= 8, "data.image_size", "an int >= 8", d.image_size),
        (d.batch_size >= 1, "data.batch_size", "an int >= 1", d.batch_size),
        (d.cache_gb >= 0, "data.cache_gb", "a number >= 0 (0: never cache)", d.cache_gb),
        (m.head in HEADS, "model.head", " or ".join(HEADS), m.head),
        (0 <= m.drop_rate < 1, "model.drop_rate", "a value in [0, 1)", m.drop_rate),
        (o.name in OPTIMIZERS, "optim.name", ", ".join(OPTIMIZERS), o.name),
        (o.lr > 0 and math.isfinite(o.lr), "optim.lr", "a positive number", o.lr),
        (o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay),
        (o.schedule in SCHEDULES, "optim.schedule", " or ".join(SCHEDULES), o.schedule),
        (o.warmup_epochs >= 0, "optim.warmup_epochs", "a number >= 0", o.warmup_epochs),
        (0 <= o.label_smoothing < 1, "optim.label_smoothing", "a value in [0, 1)",
         o.label_smoothing),
        (o.layer_decay is None or 0 < o.layer_decay <= 1, "optim.layer_decay",
         "a value in (0, 1]", o.layer_decay),
        (t.epochs >= 1, "train.epochs", "an int >= 1", t.epochs),
        (t.patience is None or t.patience >= 1, "train.patience", "an int >= 1", t.patience),
        (t.monitor in MONITORS, "train.monitor", ", ".join(MONITORS), t.monitor),
        (t.feature_cache in FEATURE_CACHE_MODES, "train.feature_cache",
         ", ".join(FEATURE_CACHE_MODES), t.feature_cache),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints", "an int >= 1", t.keep_checkpoints),
        (s.num_workers >= 1, "scaling.num_workers", "an int >= 1", s.num_workers),
        (s.cpus_per_worker > 0, "scaling.cpus_per_worker", "a number > 0", s.cpus_per_worker),
        (s.gpus_per_worker > 0, "scaling.gpus_per_worker", "a number > 0", s.gpus_per_worker),
        (s.max_failures >= -1, "scaling.max_failures", "an int >= 0, or -1 for no limit",
         s.max_failures),
        (s.placement_strategy in PLACEMENT_STRATEGIES, "scaling.placement_strategy",
         ", ".join(PLACEMENT_STRATEGIES), s.placement_strategy),
        (u.num_samples >= 1, "tune.num_samples", "an int >= 1", u.num_samples),
        (0 < u.lr_min <= u.lr_max, "tune.lr_min/lr_max", "0 < lr_min <= lr_max",
         (u.lr_min, u.lr_max)),
        (u.search in SEARCHES, "tune.search", " or ".join(SEARCHES), u.search),
        (u.grace_period >= 1, "tune.grace_period", "an int >= 1", u.grace_period),
        (u.reduction_factor >= 2, "tune.reduction_factor", "an int >= 2", u.reduction_factor),
        (u.max_concurrent >= 0, "tune.max_concurrent", "an int >= 0", u.max_concurrent),
        (u.trials_per_gpu >= 0, "tune.trials_per_gpu", "an int >= 0 (0: auto)",
         u.trials_per_gpu),
        (config.tracking.evaluate in EVALUATE_MODES, "tracking.evaluate",
         ", ".join(EVALUATE_MODES), config.tracking.evaluate),
        (u.champion_metric in CHAMPION_METRICS, "tune.champion_metric",
         ", ".join(CHAMPION_METRICS), u.champion_metric),
    ]
    for ok, key, expected, got in checks:
        if not ok:
            raise TlrayError(f"--{key}: expected {expected}, got {got!r}")
    from tlray.augment import from_config

    from_config(d)  # the preset exists and its overrides are in range
    freeze = str(m.freeze)
    if freeze != "all" and not freeze.isdigit():
        raise TlrayError(f"--model.freeze: expected a number of groups (0, 1, ...) or 'all', "
                         f"got {m.freeze!r}")
    return config


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def _copy(config: Config) -> Config:
    return from_plain(config.to_dict())


def from_plain(values: dict[str, Any]) -> Config:
    """Rebuilds a Config from `to_dict()` output (e.g. after it crossed a process boundary)."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs = {}
    for name, value in values.items():
        f = sections[name]
        section_type = _section_type(f)
        kwargs[name] = section_type(**value) if section_type else value
    return Config(**kwargs)


def _section_type(f: dataclasses.Field):
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    return type(default) if dataclasses.is_dataclass(default) else None


def _set(config: Config, key: str, value: Any, origin: str) -> None:
    """Sets `section.key` (or a nested dict of them) with type checking and suggestions."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    head, _, rest = key.partition(".")
    if head not in sections:
        raise TlrayError(_unknown(origin, key, head, list(sections)))
    section_type = _section_type(sections[head])
    if section_type is None:  # a top-level scalar such as storage_path
        if rest:
            raise TlrayError(f"{origin} {key!r}: {head} has no sub-keys")
        setattr(config, head, _coerce(value, sections[head].type, key))
        return
    section = getattr(config, head)
    if not rest:
        if not isinstance(value, dict):
            raise TlrayError(f"{origin} {key!r}: expected a mapping of {head} settings")
        for sub, sub_value in value.items():
            _set(config, f"{head}.{sub}", sub_value, origin)
        return
    fields = {f.name: f for f in dataclasses.fields(section_type)}
    if rest not in fields:
        raise TlrayError(_unknown(origin, key, rest, [f"{head}.{n}" for n in fields],
                                  prefix=f"{head}."))
    setattr(section, rest, _coerce(value, fields[rest].type, key))


def _unknown(origin: str, key: str, name: str, known: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(prefix + name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
    return f"{origin} {key!r}: unknown setting{hint}"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Converts YAML/CLI values to the field's declared type, or explains the mismatch."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation
    args = typing.get_args(hint)
    optional = type(None) in args or isinstance(hint, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise TlrayError(f"--{key}: a value is required")
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            return str(value)
        if base is dict:
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise TlrayError(f"--{key}: expected {getattr(base, '__name__', base)}, got {value!r}")
