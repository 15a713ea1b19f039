"""One trial of a sweep, and what trials take of the cluster: resources, GPU shares, how many
run at once."""

from __future__ import annotations

import dataclasses
import json

from tlray import config as config_mod
from tlray.config import Config
from tlray.config.schedule import first_depth
from tlray.train.cluster import DATA_CPU_RESERVE, worker_resources
from tlray.train.deadline import Deadline
from tlray.train.plan import Plan, preflight
from tlray.train.run import train


def run_trial(params: dict, *, plan: Plan, parent_run_id: str,
              images: dict | None = None, command: str | None = None,
              deadline: Deadline | None = None,
              uncached_depths: tuple[str, ...] = ()) -> None:
    """One trial, inside Tune: the sweep's plan with this trial's values, planned again (its
    freeze depth decides its feature cache) and trained by Ray Train (in this very process
    when `trains_in_trial_process`), on the sweep's `images`. Its MLflow run's source is
    the sweep's `command` (this process is Ray's worker, not what the user ran); a budgeted
    sweep's trial stops training by its `deadline`, and reads no feature cache at the
    `uncached_depths`, where its plan found that a cache's build does not pay."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(plan.config, params)
    uncached = first_depth(cfg.model.freeze) in uncached_depths
    if uncached:
        cfg = config_mod.with_overrides(cfg, **{"train.feature_cache": "never"})
    in_trial = trains_in_trial_process(cfg)
    trial_plan = dataclasses.replace(
        preflight(cfg, dataset=plan.dataset, in_trial_process=in_trial, progress=False),
        fault=plan.fault)  # test-only, read by the sweep's driver
    if uncached:
        trial_plan = dataclasses.replace(trial_plan, cache_note=(
            "not used: the sweep's budget plan found that its build does not pay for itself "
            "at this freeze depth"))
    trial_id = tune.get_context().get_trial_id()
    train(trial_plan, parent_run_id=parent_run_id,
          callbacks=None if in_trial else [TuneReportCallback()], in_trial_process=in_trial,
          extra_tags={"tune_trial_id": trial_id,
                      **({"mlflow.source.name": command, "mlflow.source.type": "LOCAL"}
                         if command else {})},
          run_name=f"trial-{trial_id}", images=images,
          goal=cfg.tune.goal, deadline=deadline,
          # The sweep's pick only, unless every trial's model is wanted (tune.log_models).
          evaluate=False, log_model=cfg.tune.log_models == "all")


def trial_config(cfg: Config, params: dict) -> Config:
    """The sweep's config with one trial's searched values (its Tune `config`)."""
    return config_mod.load(None, [f"{k}={json.dumps(v)}" for k, v in params.items()], base=cfg)


def trains_in_trial_process(cfg: Config) -> bool:
    """One-worker trials train in the trial's own process (see `tune.in_trial_process`)."""
    return cfg.tune.in_trial_process and cfg.scaling.max_workers == 1


def trial_resources(cfg: Config) -> dict:
    """What Tune reserves for one trial's own process: the worker's share when it trains
    there, else next to nothing (it only waits on its Train workers, which reserve theirs)."""
    return worker_resources(cfg.scaling) if trains_in_trial_process(cfg) else {"CPU": 0.01}


def trials_per_gpu(cfg: Config) -> int:
    """How many one-worker trials share a GPU: the user's number, or one from the input size.

    At 28-128 px one trial leaves an H100 launch-bound (one EfficientNet-Lite0 trial was
    measured at ~10.9k img/s at 64-128 px), so several trials per GPU raise a sweep's
    throughput; multi-worker trials keep whole GPUs (DDP across shares of one GPU gains
    nothing).
    """
    if cfg.scaling.max_workers > 1:
        return 1
    if cfg.tune.trials_per_gpu:
        return cfg.tune.trials_per_gpu
    size = cfg.data.image_size
    return 4 if size <= 64 else 2 if size <= 128 else 1


def share_gpus(cfg: Config) -> Config:
    """The sweep's config with `scaling.gpus_per_worker` set to one trial's share of a GPU,
    unless the user set it (a whole GPU, `1`, included)."""
    if not cfg.scaling.use_gpu or cfg.scaling.gpus_per_worker is not None:
        return cfg  # no GPUs, or the user chose the share
    share = 1.0 / trials_per_gpu(cfg)
    return config_mod.load(None, [f"scaling.gpus_per_worker={share}"], base=cfg)


def concurrency(cfg: Config) -> int:
    """Trials that fit the cluster at once, from the resources one trial's workers take.

    One CPU stays free for Ray Data's read tasks: if Train workers held every CPU, the
    reads of the last trials to start would wait forever (see tlray.train.cluster.check_resources).
    """
    import ray

    if cfg.tune.max_concurrent:
        return cfg.tune.max_concurrent
    total = ray.cluster_resources()
    s = cfg.scaling
    by_cpu = (total.get("CPU", 0) - DATA_CPU_RESERVE) // (s.max_workers * s.cpus_per_worker)
    if s.use_gpu:
        by_gpu = total.get("GPU", 0) // (s.max_workers * s.gpus)
        return max(1, int(min(by_gpu, by_cpu)))
    return max(1, int(by_cpu))

