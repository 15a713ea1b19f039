"""Launching a run's workers on Ray Train, with its data, and getting its final checkpoint.

Every place this run touches Ray Train is here: the splits as Ray Datasets (the feature
cache's where the plan says so), the scaling, checkpoint and failure settings, and the
final checkpoint Ray (or, in a Tune trial's own process, Tune) persisted.
"""

from __future__ import annotations

import threading
from pathlib import Path

from tlray.config import schedule
from tlray.data.dataset import DatasetInfo, load_info
from tlray.data.ingest import worker_split_config, read_split
from tlray.train.cluster import quiet_logging_config, train_workers, worker_resources
from tlray.train.in_driver import CheckpointKeeper, fit_in_driver, trains_in_driver
from tlray.train.plan import SPLITS, Plan
from tlray.train.protocol import WorkerArgs, cache_dataset, dataset_names


def read_splits(cfg, info: DatasetInfo, splits=SPLITS) -> dict:
    """A dataset's splits as Ray Datasets, in shard order: each read into Ray's object store
    once, now, when it fits `data.cache_gb`, else streamed from Parquet every epoch.

    A sweep reads its images once and hands them to all its trials, so that they neither
    read the same shards again nor keep a copy each in the object store.
    """
    return {name: read_split(info, name, cache=in_memory(cfg, info, name)) for name in splits}


def in_memory(cfg, info: DatasetInfo, split: str) -> bool:
    """Whether a split is read once into Ray's object store (else streamed every epoch)."""
    return info.split_bytes(split) <= cfg.data.cache_gb * 2**30


def fit(plan: Plan, args: WorkerArgs, *, name: str, callbacks: list | None = None,
        images: dict | None = None):
    """Runs the workers; returns the run's final checkpoint (best weights, history, test).

    In a Tune trial's own process, Train's local mode (`num_workers=0`) runs the loop here
    without a controller or workers; its reports go straight to Tune, which persists their
    checkpoints in the trial's directory (local mode would only hand back a temporary one).
    A one-worker CPU run on a one-machine cluster trains here too (`tlray.train.in_driver`).

    Args:
        name: the run's name in Ray storage.
        callbacks: Ray Train callbacks (a sweep's trial passes Tune's reporting callback).
        images: the dataset's image splits from `read_splits`, when the caller (a sweep)
            read them once for all its runs; read here otherwise.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from tlray.train.loop import train_loop_per_worker

    cfg, s = plan.config, plan.config.scaling
    datasets, held = run_datasets(plan, images)
    keeper = None if args.in_trial_process or not trains_in_driver(cfg) else CheckpointKeeper(
        Path(plan.storage) / name, cfg.train.keep_checkpoints, cfg.train.monitor,
        cfg.monitor_mode)
    trainer = lambda: TorchTrainer(  # noqa: E731 - a fresh one for each attempt
        train_loop_per_worker, train_loop_config={"args": args, "keeper": keeper},
        scaling_config=scaling_config(s, here=args.in_trial_process or keeper is not None),
        run_config=ray.train.RunConfig(
            name=name, storage_path=plan.storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=cfg.train.monitor,
                checkpoint_score_order=cfg.monitor_mode),
            failure_config=ray.train.FailureConfig(
                max_failures=s.max_failures, max_preemption_failures=s.max_preemptions),
            logging_config=quiet_logging_config(), callbacks=callbacks or None),
        # Training in lockstep: every worker the same number of steps, so that they ask for
        # preemption notices (a barrier) at the same steps.
        datasets=datasets, dataset_config=worker_split_config(
            lockstep=("train", cache_dataset("train")), in_memory=held))
    if args.in_trial_process:
        from ray import tune

        run_trainer(trainer)
        checkpoint = tune.get_checkpoint()  # the last one reported, as Tune persisted it
    else:
        checkpoint = run_trainer(trainer, keeper, worker_resources(s), s.max_failures)
    if checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return checkpoint


def scaling_config(s, here: bool):
    """Ray Train's scaling for `s` (a config's `scaling`): the run's workers, or, `here`,
    none: Ray Train's local mode runs the loop in this process."""
    import ray.train

    if here:
        return ray.train.ScalingConfig(num_workers=0, use_gpu=s.use_gpu)
    return ray.train.ScalingConfig(
        num_workers=train_workers(s), use_gpu=s.use_gpu,
        resources_per_worker=worker_resources(s), placement_strategy=s.placement_strategy,
        elastic_resize_monitor_interval_s=s.grow_check_every)


def run_trainer(make_trainer, keeper: CheckpointKeeper | None = None,
                resources: dict | None = None, max_failures: int = 0):
    """Fits a trainer from `make_trainer()`; returns the checkpoint it ended with.

    With a `keeper` (a one-worker run in this process, `tlray.train.in_driver`), tlray holds
    the worker's `resources`, keeps the checkpoints and retries up to `max_failures` times;
    otherwise Ray Train does.
    """
    if keeper is not None:  # on this thread: local mode installs no SIGINT handler, and
        # Ctrl-C then unwinds the loop itself (its Ray Data reads closed while Ray is up)
        return fit_in_driver(lambda: make_trainer().fit(), keeper, resources, max_failures)
    result = fit_interruptibly(make_trainer())
    if result.error is not None:
        raise result.error
    return result.checkpoint


def run_datasets(plan: Plan, images: dict | None = None) -> tuple[dict, set[str]]:
    """The Ray Datasets a run's workers read, by name (its image splits, and the feature
    cache's where the plan says so), and the names of those held in Ray's object store.

    With `data.shuffle` the training blocks come in an order seeded by `train.seed` (the
    same run sees the same batches); without it, in the order of the shards.
    """
    cfg = plan.config
    names = dataset_names(plan.cache, len(schedule.parse(cfg.model.freeze)))
    cached = [n for n in SPLITS if cache_dataset(n) in names]
    cache_info = load_info(plan.cache.uri) if cached else None
    datasets = ({cache_dataset(n): ds for n, ds in read_splits(
        cfg, cache_info, cached).items()} if cached else {})
    held = {n for n in SPLITS if n in names and in_memory(cfg, plan.dataset, n)} | {
        cache_dataset(n) for n in cached if in_memory(cfg, cache_info, n)}
    wanted = [n for n in SPLITS if n in names]
    images = images or read_splits(cfg, plan.dataset, wanted)
    datasets.update({n: images[n] for n in wanted})
    if cfg.data.shuffle:
        for split in ("train", cache_dataset("train")):
            if split in datasets:
                datasets[split] = datasets[split].randomize_block_order(seed=cfg.train.seed)
    return datasets, held


def fit_interruptibly(trainer):
    """`trainer.fit()`, where Ctrl-C is a KeyboardInterrupt as everywhere else in tlray.

    Called from the main thread, Ray Train's fit installs a SIGINT handler of its own: it
    aborts the run and then ends the process with status 1, saying nothing. Run from a
    helper thread it installs none, and the interrupt reaches tlray, which ends the MLflow
    run KILLED and exits with status 130; the run's Ray actors end with this process.
    """
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()  # e.g. a Tune trial's function thread
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread as is
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
