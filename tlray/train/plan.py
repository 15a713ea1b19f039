"""The preflight: everything a run needs, resolved once on the driver, before Ray reserves a
worker, into one frozen `Plan`.

In order: the dataset (a source is prepared first), its splits, the model (built once here,
so that a bad backbone, weight source or freeze depth fails now), the MLflow store and the
Ray cluster (does it hold the workers?), and the feature cache: whether this run reads one,
which splits, and why, built now if it is missing. `tlray train`, every sweep trial and both
sides of `tlray compare` start from a plan; the workers receive the part they need
(`WorkerArgs`) and re-derive nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from tlray import config as config_mod
from tlray import paths
from tlray.config import Config
from tlray.config.augmentation import AUTO
from tlray.config.augmentation import from_config as augmentation_from_config
from tlray.data.atomic import build_lock
from tlray.data.augment_choice import choose_augmentation
from tlray.data.dataset import DatasetInfo
from tlray.data.prepare import resolve_dataset
from tlray.errors import TlrayError
from tlray.model import feature_cache
from tlray.model.build import ModelInfo, build_for_run
from tlray.model.cut import cut_model
from tlray.serve import log_model as logged_model
from tlray.track.store import check_tracking_server, configure
from tlray.train import faults
from tlray.train.cluster import check_resources, in_ray_actor, init_ray, worker_resources
from tlray.train.protocol import CachePlan
from tlray.train.threads import own_threads

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Plan:
    """One run, resolved. Picklable: a sweep hands its plan to every trial."""

    config: Config  # absolute dataset URI, storage path and tracking URI filled in
    dataset: DatasetInfo
    model: ModelInfo
    cache: CachePlan | None  # None: every split is read as images
    cache_note: str  # why this run does (not) read a feature cache
    tracking_uri: str
    augment_note: str = ""  # the augmentation and, when data.augment=auto chose it, why
    fault: str | None = field(default=None, repr=False)  # test-only, see tlray.train.faults

    @property
    def experiment(self) -> str:
        return self.config.tracking.experiment or f"tlray-{self.dataset.name}"

    @property
    def storage(self) -> str:
        return self.config.storage_path


def preflight(cfg: Config, *, dataset: DatasetInfo | None = None, plan_cache: bool = True,
              in_trial_process: bool = False, progress: bool = True) -> Plan:
    """Resolves and checks `cfg` into a plan; fails with a `TlrayError` before any work.

    Args:
        dataset: the prepared dataset, when the caller resolved it already (a sweep's trial).
        plan_cache: decide (and build) the feature cache; a sweep leaves that to each trial,
            whose freeze depth decides it.
        in_trial_process: this process is a Tune trial holding one worker's resources: a
            missing cache is built right here instead of in a Ray task.
        progress: a bar while a source is prepared.
    """
    info = dataset or resolve_dataset(cfg.data.dataset, progress=progress)
    require_splits(info)
    cfg, augment_note = resolve_augmentation(cfg, info, say=progress)
    model, minfo = check_model(cfg, info)
    if not in_ray_actor() and cfg.tracking.log_model and cfg.tracking.evaluate != "never":
        # A driver, before Ray's threads start: their lazy imports can deadlock this one (see
        # there). A sweep's trial (an actor) leaves evaluating to its driver.
        logged_model.import_evaluators()
    uri = connect(cfg)
    cfg = config_mod.with_overrides(cfg, **{
        "data.dataset": info.uri, "tracking.tracking_uri": uri,
        "storage_path": cfg.storage_path or paths.ray_results_dir()})
    cache, note = (plan_feature_cache(cfg, info, model, minfo, in_this_process=in_trial_process)
                   if plan_cache else (None, "decided by each trial"))
    return Plan(config=cfg, dataset=info, model=minfo, cache=cache, cache_note=note,
                tracking_uri=uri, augment_note=augment_note, fault=faults.from_env())


def resolve_augmentation(cfg: Config, info: DatasetInfo, *, say: bool = True
                         ) -> tuple[Config, str]:
    """`data.augment=auto` decided from the data, and why (said on the console, tagged on
    the run); a preset the user named is kept as it is."""
    if cfg.data.augment != AUTO:
        return cfg, cfg.data.augment
    preset, why = choose_augmentation(info)
    if say:
        print(f"augmentation: {preset} (data.augment=auto: {why})", flush=True)
    return (config_mod.with_overrides(cfg, **{"data.augment": preset}),
            f"{preset} (data.augment=auto: {why})")


def require_splits(info: DatasetInfo) -> None:
    missing = [s for s in SPLITS if s not in info.splits]
    if missing:
        raise TlrayError(f"dataset {info.uri} has no {missing[0]!r} split; prepare it with "
                         f"train, val and test fractions")


def check_model(cfg: Config, info: DatasetInfo) -> tuple[torch.nn.Module, ModelInfo]:
    """Builds the model as the workers will, seeded as they seed it: every model error
    surfaces before Ray starts, and the feature cache is computed from these weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return build_for_run(cfg, info)


def connect(cfg: Config) -> str:
    """Points MLflow at the configured store (failing fast if a server is unreachable), joins
    or starts Ray, and checks that the workers fit. Returns the tracking URI."""
    if cfg.tracking.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = cfg.tracking.tracking_uri
    uri = configure()
    check_tracking_server(uri)
    init_ray()
    check_resources(cfg.scaling)
    return uri


def plan_feature_cache(cfg: Config, info: DatasetInfo, model: torch.nn.Module,
                       minfo: ModelInfo, *, in_this_process: bool = False) -> tuple[CachePlan | None, str]:
    """Whether this run reads a frozen-front feature cache, which splits, and why.

    The one place that decides it. Augmented training images change every epoch, so the
    whole model trains on them and only validation may read the cache; in `auto` mode a
    cache is then not built for validation alone. A missing cache is built now (see
    `build_cache`) and kept under `<storage>/feature_cache` for every later run and sweep
    trial with the same data, weights, freeze depth and input size.
    """
    mode = cfg.train.feature_cache
    cut, why = feature_cache.choose(mode, model, minfo.data_config["input_size"], info,
                                    cfg.data.cache_gb * 2**30)
    if cut is None:
        return None, why
    key = feature_cache.cache_key(cut, info, minfo.data_config, cfg.data.image_size)
    uri = feature_cache.cache_uri(f"{cfg.storage_path.rstrip('/')}/feature_cache", key)
    found = feature_cache.existing(uri)
    splits = feature_cache.CACHED_SPLITS
    if augmentation_from_config(cfg.data).enabled:
        if found is None and mode == "auto":
            return None, ("not used: training images are augmented (the cached front would "
                          "be the wrong input for them), and a cache only for validation "
                          "does not pay for its building (train.feature_cache=always builds "
                          "one)")
        splits, why = ("val",), f"validation only: {why} (training images are augmented)"
    if found is None:
        with build_lock(uri, on_wait=lambda: print(
                f"feature cache: waiting for another run's build of the {why}", flush=True)):
            if feature_cache.existing(uri) is None:  # (the other run's build is done now)
                print(f"feature cache: computing the {why} (freeze {cfg.model.freeze})",
                      flush=True)
                build_cache(cfg, info, uri, key, in_this_process=in_this_process)
    return CachePlan(uri=uri, cut=cut.after, shape=tuple(cut.shape), splits=splits,
                     reason=why), why


def build_cache(cfg: Config, info: DatasetInfo, uri: str, key: str, *,
                in_this_process: bool) -> None:
    """Builds a feature cache by a Ray task with one Train worker's resources (its GPU too),
    or in this process when it holds those resources itself (`in_this_process`)."""
    if in_this_process:
        _build_feature_cache(cfg, info, uri, key)
        return
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    resources = worker_resources(cfg.scaling)
    build = ray.remote(_build_feature_cache).options(
        num_cpus=resources["CPU"], num_gpus=resources.get("GPU", 0),
        # Outside the caller's placement group (a Tune trial's holds 0.01 CPU).
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    ray.get(build.remote(cfg, info, uri, key))


def _build_feature_cache(cfg: Config, info: DatasetInfo, uri: str, key: str) -> None:
    """One cache, computed where a Train worker would run, from the model the plan checked."""
    model, minfo = check_model(cfg, info)
    cut = cut_model(model, minfo.data_config["input_size"])
    if cut is None or feature_cache.cache_key(cut, info, minfo.data_config,
                                              cfg.data.image_size) != key:
        raise TlrayError(f"the weights of {cfg.model.backbone} ({cfg.model.weights}) changed "
                         f"while the feature cache was being planned; run again")
    cuda = cfg.scaling.use_gpu and torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(own_threads(cfg.scaling.cpus_per_worker))
    feature_cache.build(cut, info, uri, mean=minfo.data_config["mean"],
                        std=minfo.data_config["std"], size=cfg.data.image_size,
                        device="cuda" if cuda else "cpu", amp=cuda and cfg.train.amp,
                        channels_last=cfg.train.channels_last)
