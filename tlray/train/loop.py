"""The per-worker training loop: what every Ray Train worker runs, top to bottom.

One call of `train_loop_per_worker` is one worker of one training run (or a whole one-worker
sweep trial, run inside the Tune trial's own process and reporting to Tune). It gets its
`WorkerArgs` from the driver's plan, builds the model (frozen groups first, then DDP),
resumes from the last checkpoint if Ray restarted it, and trains epoch by epoch on its own
shard of the data. After every epoch the metrics are reduced across workers and reported
with a checkpoint. When training ends (or stops early) the best weights are tested on the
test split and the final report carries them; the driver logs it to MLflow.

Every random draw of an epoch (data order, augmentation, dropout) follows from
(train.seed, epoch, rank), so a run resumed from a checkpoint trains exactly as if it had
never stopped. Only rank 0 writes checkpoints, logs metrics to MLflow and prints progress.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from tlray.config.augmentation import from_config as augmentation_from_config
from tlray.data.augment import Augmenter
from tlray.data.ingest import iter_image_batches
from tlray.data.preprocess import to_model_input
from tlray.model.build import ModelInfo, build_model
from tlray.model.cut import ModelSplit, split_model
from tlray.model.feature_cache import load_front
from tlray.track.epoch_log import EpochLogger
from tlray.train import checkpoint, faults
from tlray.train.checkpoint import TrainingState
from tlray.train.cluster import quiet_train_worker
from tlray.train.progress import EpochTicker, progress_bar, progress_line, say_line
from tlray.train.protocol import EpochMetrics, Report, TestMetrics, WorkerArgs
from tlray.train.steps import (
    evaluate,
    features_input,
    gather,
    make_optimizer,
    reduce_totals,
    train_epoch,
    train_step,
)
from tlray.train.threads import borrowed_threads, own_threads


def train_loop_per_worker(loop_config: dict) -> None:
    """One worker of one run; `loop_config["args"]` is its `WorkerArgs` from the plan."""
    args: WorkerArgs = loop_config["args"]
    cfg, monitor = args.config, args.config.train.monitor
    ray_ = worker_session(args.in_trial_process)
    say = functools.partial(say_line, label=args.label) if ray_.rank == 0 else _silent
    device = setup_device(cfg, ray_.world)

    net = setup_model(args, device)
    feeds = Feeds.for_run(args, net.info)
    steps_per_epoch = max(1, math.ceil(args.dataset.splits["train"].rows / ray_.world
                                       / cfg.data.batch_size))
    optimizer, scheduler = make_optimizer(net.trained, cfg.optim, cfg.train.epochs,
                                          steps_per_epoch)
    trained = ray_.prepare_model(net.trained)  # to the device; DDP-wrapped with workers > 1
    state, best_weights = resume(ray_, net.model, optimizer, scheduler, say)
    forward = prepare_forward(trained, cfg)
    step = functools.partial(train_step, forward=forward, optimizer=optimizer,
                             scheduler=scheduler, amp=autocast(cfg, device),
                             criterion=nn.CrossEntropyLoss(
                                 label_smoothing=cfg.optim.label_smoothing))
    shards = {name: ray_.dataset_shard(name) for name in ("train", "val", "test")}
    logger = EpochLogger(args.run_id, args.tracking_uri, enabled=ray_.rank == 0)
    logger.tag("train_node_ids", ",".join(sorted(set(gather(ray_.node_id, ray_.world)))))

    for epoch in range(state.epoch + 1, cfg.train.epochs + 1 if not state.trained else 0):
        # ---- train one epoch on this worker's shard; its random draws follow from the epoch
        t0 = time.perf_counter()
        generator = seed_epoch(cfg.train.seed, epoch, ray_.rank)
        if not _on_gpu(device) and ray_.world == 1 and cfg.scaling.borrow_idle_cpus:
            torch.set_num_threads(borrowed_threads(cfg.scaling.cpus_per_worker))
        ticker = EpochTicker(epoch, cfg.train.epochs, args.dataset.splits["train"].rows,
                             None if args.interactive or ray_.rank else say, t0)
        trained.train()
        with _join(trained), progress_bar(args.interactive and ray_.rank == 0,
                                          steps_per_epoch, epoch, cfg.train.epochs) as bar:
            def after_step(global_step: int, seen: int) -> None:
                bar.update(1)
                ticker.tick(seen * ray_.world)
                faults.maybe_fail(args.fault, ray_.rank, global_step, args.restart_key)

            batches = feeds.batches(shards["train"], "train", cfg, device, generator)
            totals, state.step = train_epoch(
                batches, functools.partial(step, feed=feeds.train(cfg.train.seed, epoch,
                                                                  ray_.rank)),
                state.step, device, after_step)
        train_seconds = time.perf_counter() - t0
        totals = reduce_totals(totals, ray_.world, device)

        # ---- validate on every worker's shard, then combine
        val = evaluate(net.validated, feeds.batches(shards["val"], "val", cfg, device),
                       args.dataset.num_classes, feeds.val, autocast(cfg, device), device,
                       ray_.world)
        row = EpochMetrics(epoch=epoch, train_loss=totals.loss, train_acc=totals.acc,
                           val_loss=val.loss, val_acc=val.acc, val_auc=val.auc,
                           lr=optimizer.param_groups[0]["lr"],
                           img_per_s=totals.seen / train_seconds,
                           epoch_seconds=time.perf_counter() - t0)
        if state.record(row, monitor, cfg.monitor_mode, cfg.train.patience, cfg.train.epochs,
                        cfg.tune.goal):
            best_weights = _snapshot(net.model)

        # ---- checkpoint and report (rank 0 writes; every rank reports)
        report(ray_, Report(row, monitor, state.best_epoch, state.best_value),
               lambda d: checkpoint.save_training(d, net.model, optimizer, scheduler, state,
                                                  best_weights))
        logger.log(dataclasses.asdict(row), epoch)
        say(progress_line(row, cfg.train.epochs))
        if state.goal_reached:
            say(f"early stopping: {monitor} {getattr(row, monitor):.4f} reached the goal "
                f"{cfg.tune.goal:g}")
            break
        if state.stopped_early:
            say(f"early stopping: {monitor} has not improved for {state.bad_epochs} epochs "
                f"(best {state.best_value:.4f} at epoch {state.best_epoch})")
            break

    # ---- the best weights, tested once on the test split, in the final report
    test = final_test(net, best_weights, feeds.batches(shards["test"], "test", cfg, device,
                                                       with_ids=True),
                      feeds.images, cfg, device, ray_.world)
    state.trained = True
    final = Report(state.best_row(), monitor, state.best_epoch, state.best_value, final=True,
                   test=TestMetrics(test.loss, test.acc, test.auc, test.rows),
                   stopped_early=state.stopped_early, epochs_run=state.epoch,
                   epochs_seconds=sum(r["epoch_seconds"] for r in state.history))
    report(ray_, final, lambda d: checkpoint.save_final(d, net.model, state, final, test,
                                                        args.dataset.classes))
    logger.close()  # the driver logs the test metrics, linked to the model and the test split


# --------------------------------------------------------------------------- setup


class WorkerSession(NamedTuple):
    """What the loop needs from Ray, wherever it runs."""

    rank: int
    world: int
    node_id: str
    report: Callable  # (metrics, checkpoint=...)
    get_checkpoint: Callable
    prepare_model: Callable  # to the device, DDP-wrapped when world > 1
    checkpoint_class: type
    dataset_shard: Callable  # split name -> this worker's part of it


def worker_session(in_trial_process: bool) -> WorkerSession:
    """Ray Train's worker APIs, or Ray Tune's in a Tune trial's own process.

    There (Train's local mode) the loop talks to Tune itself: local mode keeps reports to
    itself rather than passing them (and their checkpoints) on, and Ray refuses
    `ray.train.get_context` (which `prepare_model` calls) inside a Tune function. With one
    process there is nothing to wrap in DDP: preparing a model is moving it to the device.
    """
    import ray
    import ray.train
    import ray.train.torch

    quiet_train_worker()
    # DDP's note that depthwise-conv gradients are laid out differently from its buckets is
    # about a copy, not about correctness; keep it out of the per-epoch output.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    node_id = ray.get_runtime_context().get_node_id()
    if in_trial_process:
        from ray import tune

        def to_device(model: nn.Module) -> nn.Module:
            return model.to(ray.train.torch.get_device())

        return WorkerSession(0, 1, node_id, tune.report, tune.get_checkpoint, to_device,
                             tune.Checkpoint, ray.train.get_dataset_shard)
    ctx = ray.train.get_context()
    return WorkerSession(ctx.get_world_rank(), ctx.get_world_size(), node_id,
                         ray.train.report, ray.train.get_checkpoint,
                         ray.train.torch.prepare_model, ray.train.Checkpoint,
                         ray.train.get_dataset_shard)


def setup_device(cfg, world: int) -> torch.device:
    """The worker's device, its CPU threads and cudnn's autotuner."""
    import ray.train.torch

    device = ray.train.torch.get_device()
    if _on_gpu(device):
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(own_threads(cfg.scaling.cpus_per_worker))
    return device


@dataclass
class RunModel:
    """The run's network and its parts: `model` is the whole model (checkpointed, tested on
    images); `trained` is what the optimizer updates (the part after the cut when training
    reads the feature cache); `validated` what validation runs (likewise for validation)."""

    model: nn.Module
    info: ModelInfo
    split: ModelSplit | None
    trained: nn.Module
    validated: nn.Module


def setup_model(args: WorkerArgs, device) -> RunModel:
    """The model the plan checked: same seed, new head, frozen groups (before DDP, so that
    DDP never tracks frozen parameters), cut where the feature cache was cut."""
    cfg, info = args.config, args.dataset
    torch.manual_seed(cfg.train.seed)
    model, minfo = build_model(cfg.model.backbone, info.num_classes, in_chans=info.channels,
                               img_size=cfg.data.image_size, weights=cfg.model.weights,
                               head=cfg.model.head, freeze=cfg.model.freeze,
                               drop_rate=cfg.model.drop_rate)
    if args.cache is None:
        return RunModel(model, minfo, None, model, model)
    split = split_model(model, minfo.data_config["input_size"])
    if split is None or split.cut != args.cache.cut:
        raise RuntimeError(f"the worker cut the model after {split and split.cut}, the plan "
                           f"after {args.cache.cut}: the plan and the worker disagree")
    load_front(args.cache.uri, split.front)  # the weights that computed the cache
    trained = split.rest if args.cache.trains_on_cache else model
    return RunModel(model, minfo, split, trained, split.rest.to(device))


@dataclass
class Feeds:
    """What turns each split's batches into model input: images (resized, normalised, and
    for training augmented), or the feature cache's activations as they are."""

    images: Callable
    features: Callable
    augmentation: object
    cache_splits: tuple[str, ...]
    image_shape: tuple
    cache_shape: tuple | None

    @classmethod
    def for_run(cls, args: WorkerArgs, minfo: ModelInfo) -> Feeds:
        cfg = args.config
        size = (cfg.data.image_size, cfg.data.image_size)
        return cls(images=functools.partial(to_model_input, mean=minfo.data_config["mean"],
                                            std=minfo.data_config["std"], size=size,
                                            channels_last=cfg.train.channels_last),
                   features=functools.partial(features_input,
                                              channels_last=cfg.train.channels_last),
                   augmentation=augmentation_from_config(cfg.data),
                   cache_splits=args.cache.splits if args.cache else (),
                   image_shape=args.dataset.image_shape,
                   cache_shape=args.cache.shape if args.cache else None)

    def train(self, seed: int, epoch: int, rank: int) -> Callable:
        if "train" in self.cache_splits:
            return self.features
        if not self.augmentation.enabled:
            return self.images
        return functools.partial(self.images,
                                 augment=Augmenter(self.augmentation, epoch_seed(seed, epoch),
                                                   rank))

    @property
    def val(self) -> Callable:
        return self.features if "val" in self.cache_splits else self.images

    def batches(self, shard, split: str, cfg, device, shuffle=None, with_ids=False):
        cached = split in self.cache_splits
        return iter_image_batches(shard, self.cache_shape if cached else self.image_shape,
                                  cfg.data.batch_size, dtype="float32" if cached else "uint8",
                                  device=device, shuffle=shuffle if cfg.data.shuffle else None,
                                  with_ids=with_ids)


def resume(ray_: WorkerSession, model, optimizer, scheduler, say
           ) -> tuple[TrainingState, dict | None]:
    """The state of a run Ray restarted (after a failure, or a resumed sweep), else a fresh
    one. Loaded after the move to the device, so the optimizer's state lands beside its
    parameters."""
    found = ray_.get_checkpoint()
    if found is None:
        return TrainingState(), None
    with found.as_directory() as d:
        state, best = checkpoint.load_training(Path(d), model, optimizer, scheduler)
    state.resumed += 1
    say(f"resumed from the checkpoint of epoch {state.epoch}")
    return state, best


def prepare_forward(trained: nn.Module, cfg) -> nn.Module:
    """channels_last memory (faster convolutions) and, if asked, torch.compile."""
    if cfg.train.channels_last:
        trained = trained.to(memory_format=torch.channels_last)
    return torch.compile(trained) if cfg.train.compile else trained


def autocast(cfg, device):
    return torch.autocast("cuda", dtype=torch.bfloat16,
                          enabled=_on_gpu(device) and cfg.train.amp)


# --------------------------------------------------------------------------- each epoch


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one worker's epoch: a function of (train.seed, epoch, rank) alone."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def seed_epoch(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Seeds the epoch's dropout and drop-path draws; returns the generator of its data order.

    Derived from (seed, epoch, rank) rather than carried over from the epoch before, so a
    run resumed at an epoch boundary draws exactly what the uninterrupted run drew.
    """
    torch.manual_seed(epoch_seed(seed, epoch, rank))
    return torch.Generator().manual_seed(epoch_seed(seed, epoch, rank) + 1)


def report(ray_: WorkerSession, what: Report, write_checkpoint: Callable[[Path], None]) -> None:
    """One report from every rank; rank 0 also writes the checkpoint that goes with it."""
    with tempfile.TemporaryDirectory() as tmp:
        found = None
        if ray_.rank == 0:
            write_checkpoint(Path(tmp))
            found = ray_.checkpoint_class.from_directory(tmp)
        ray_.report(what.metrics(), checkpoint=found)


def final_test(net: RunModel, best_weights: dict | None, batches, feed, cfg, device,
               world: int):
    """The best weights (the whole model: a cached front joins the rest) on test images."""
    model = net.model
    if best_weights is not None:
        model.load_state_dict(best_weights)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    return evaluate(model, batches, net.info.num_classes, feed, autocast(cfg, device), device,
                    world, keep=True)


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _on_gpu(device) -> bool:
    return torch.device(device).type == "cuda"


def _silent(line: str) -> None:
    pass


class _NoJoin:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _join(model):
    """DDP's join(): workers with fewer batches shadow the collectives of the others."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.join()
    return _NoJoin()
