"""The per-worker training loop: what every Ray Train worker runs, top to bottom.

One call of `train_loop_per_worker` is one worker of one training run (or a whole one-worker
sweep trial, run inside the Tune trial's own process and reporting to Tune). It gets its
`WorkerArgs` from the driver's plan, builds the model (frozen groups first, then DDP),
resumes from the last checkpoint if Ray restarted it, and trains epoch by epoch on its own
shard of the data, phase by phase when `model.freeze` is a schedule (`tlray.train.phases`).
After every epoch the metrics are reduced across workers and reported with a checkpoint.
When training ends (or stops early) the best weights are tested on the test split and the
final report carries them; the driver logs it to MLflow.

Every random draw of an epoch (data order, augmentation, dropout) follows from
(train.seed, epoch, rank), so a run resumed from a checkpoint trains exactly as if it had
never stopped. With `train.ema`, a running average of the weights is what is validated,
kept as the best and tested. Only rank 0 writes checkpoints, logs to MLflow and prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
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

from tlray.config.schedule import parse as parse_schedule
from tlray.config.interval import parse_every
from tlray.config.schedule import phase_at
from tlray.model.build import (
    ModelInfo,
    build_for_run,
    model_groups,
    resolve_freeze,
    set_frozen_depth,
)
from tlray.model.cut import ModelSplit, split_model
from tlray.model.feature_cache import load_front
from tlray.track.epoch_log import EpochLogger
from tlray.train import checkpoint, faults
from tlray.train.checkpoint import TrainingState
from tlray.train.cluster import quiet_train_worker
from tlray.train.feeds import Feeds, seed_epoch
from tlray.train.phases import PhaseRun, enter_phase
from tlray.train.position import (
    PREEMPTION,
    MidEpochCheckpoints,
    Position,
    position_in,
    rescale_steps,
)
from tlray.train.progress import EpochTicker, progress_bar, progress_line, say_line
from tlray.train.protocol import (
    EpochMetrics,
    Report,
    TestMetrics,
    WorkerArgs,
    dataset_names,
)
from tlray.train.steps import (autocast, evaluate, gather, on_gpu, reduce_totals,
                              train_epoch)
from tlray.train.threads import borrowed_threads, own_threads


def train_loop_per_worker(loop_config: dict) -> None:
    """One worker of one run; `loop_config["args"]` is its `WorkerArgs` from the plan."""
    run = WorkerRun(loop_config["args"])  # model, data, optimizer; resumed if Ray restarted it
    for epoch in run.epochs_left():
        run.enter_phase_of(epoch)  # a freeze schedule's next phase, when one begins
        totals, seconds = run.train_epoch(epoch)  # this worker's shard, reduced over all
        row = run.validate(epoch, totals, seconds)  # every worker's shard, the best kept
        run.report_epoch(row)  # checkpoint (rank 0 writes), MLflow, the epoch's line
        if run.state.stopped_early:
            run.say_why_it_stopped(row)
            break
    run.test_and_report()  # the best weights on the test split, in the final report


class WorkerRun:
    """Everything one worker holds through its run; the loop above calls its steps in order."""

    def __init__(self, args: WorkerArgs):
        self.args, cfg = args, args.config
        self.cfg, self.monitor = cfg, cfg.train.monitor
        self.ray = ray_ = worker_session(args.in_trial_process)
        self.say = functools.partial(say_line, label=args.label) if ray_.rank == 0 else _silent
        self.device = setup_device(cfg, ray_.world)
        self.amp = autocast(cfg.train.amp, self.device)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

        self.net = setup_model(args, self.device)
        self.feeds = Feeds.for_run(args, self.net.info)
        self.phases = parse_schedule(cfg.model.freeze, cfg.train.epochs)
        self.steps_per_epoch = max(1, math.ceil(
            args.dataset.splits["train"].rows // ray_.world / cfg.data.batch_size))
        found = ray_.get_checkpoint()
        self.state = state = checkpoint.peek(found) or TrainingState()
        written_at = state.step  # in steps of the workers that wrote the checkpoint
        resized = rescale_steps(state, ray_.world)  # an elastic run, restarted resized
        self.ema = make_ema(self.net.model, cfg)
        self.phase = self._enter(state.phase, first_step=state.phase_start_step)
        self.best_weights = resume(found, self.net.model, self.phase, self.ema, state,
                                   self.say, resized)
        self.shards = {name: ray_.dataset_shard(name)
                       for name in dataset_names(args.cache, len(self.phases))}
        self.logger = EpochLogger(args.run_id, args.tracking_uri, enabled=ray_.rank == 0)
        self.logger.tag("train_node_ids",
                        ",".join(sorted(set(gather(ray_.node_id, ray_.world)))))
        if found is not None:
            note_resume(self.logger, state, self.phases, self.say, written_at)
        state.run_id = args.run_id
        self.mid_epoch = MidEpochCheckpoints(
            parse_every(cfg.train.checkpoint_every), cfg.scaling.notice_check_every,
            ray_.preemption_notice, ray_.world, self.device)
        self.mid_epoch.restart_clock(state.step)

    def epochs_left(self) -> range:
        return range(self.state.epoch + 1,
                     self.cfg.train.epochs + 1 if not self.state.trained else 0)

    def enter_phase_of(self, epoch: int) -> None:
        index = phase_at(self.phases, epoch)
        if index != self.phase.index:
            self.phase = self._enter(index, first_step=self.state.step)
            self.state.phase, self.state.phase_start_step = index, self.state.step

    def _enter(self, index: int, first_step: int) -> PhaseRun:
        return enter_phase(index, self.phases, self.net, self.args, self.ray.prepare_model,
                           steps_per_epoch=self.steps_per_epoch, first_step=first_step,
                           world=self.ray.world, ema=self.ema)

    # ---- train one epoch on this worker's shard (from where a mid-epoch checkpoint left
    #      it, when resumed inside it); its random draws follow from the epoch

    def train_epoch(self, epoch: int):
        """The epoch's training totals, reduced over the workers, and its seconds."""
        cfg, ray_, state = self.cfg, self.ray, self.state
        at = position_in(state.position, epoch)
        skip = at.steps_to_skip(ray_.world) if at else 0
        self.epoch, self.epoch_first_step, state.position = epoch, state.step - skip, None
        self.t0 = time.perf_counter() - (at.seconds if at else 0.0)
        generator = seed_epoch(cfg.train.seed, epoch, ray_.rank)
        if not on_gpu(self.device) and ray_.world == 1 and cfg.scaling.borrow_idle_cpus:
            torch.set_num_threads(borrowed_threads(cfg.scaling.cpus_per_worker))
        ticker = EpochTicker(epoch, cfg.train.epochs, self.args.dataset.splits["train"].rows,
                             None if self.args.interactive or ray_.rank else self.say, self.t0)
        phase = self.phase
        phase.trained.train()
        with _join(phase.trained), progress_bar(self.args.interactive and ray_.rank == 0,
                                                self.steps_per_epoch, epoch,
                                                cfg.train.epochs) as bar:
            def after_step(global_step: int, running) -> None:
                if self.ema is not None:
                    self.ema.update(self.net.model, step=global_step)
                bar.update(1)
                ticker.tick(running.seen * ray_.world)
                faults.maybe_fail(self.args.fault, ray_.rank, global_step,
                                  self.args.restart_key)
                self._maybe_checkpoint_inside_epoch(global_step, running)

            feed = self.feeds.train(phase.on_cache, cfg.train.seed, epoch, ray_.rank)
            totals, state.step = train_epoch(
                self.feeds.batches(self.shards, "train", phase.on_cache, cfg, self.device,
                                   generator, skip=skip),
                functools.partial(phase.step, feed=feed, criterion=self.criterion,
                                  amp=self.amp),
                state.step, self.device, after_step,
                start=at.totals() if at is not None and ray_.rank == 0 else None)
        seconds = time.perf_counter() - self.t0
        return reduce_totals(totals, ray_.world, self.device), seconds

    def _maybe_checkpoint_inside_epoch(self, global_step: int, running) -> None:
        """A checkpoint with the position in the epoch (`tlray.train.position`) when one is
        due. While a node drains, MLflow also holds the last step reached (checked), so the
        resumed run can log what the preemption cost. Every rank calls it at each step."""
        why = self.mid_epoch.due(global_step)
        if why is not None:
            self._checkpoint_inside_epoch(why, global_step, running)
        if self.mid_epoch.noticed is not None and (
                why is not None or global_step % self.mid_epoch.check_every == 0):
            self.logger.tag(LAST_STEP_TAG, str(global_step))

    def _checkpoint_inside_epoch(self, why: str, global_step: int, running) -> None:
        state, world = self.state, self.ray.world
        totals = reduce_totals(running.snapshot(), world, self.device)
        state.step, state.position = global_step, Position(
            self.epoch, global_step - self.epoch_first_step, world, totals.loss_sum,
            totals.correct, totals.seen, time.perf_counter() - self.t0, why).to_dict()
        if why == PREEMPTION:
            state.preemptions += 1
            note_preemption(self.logger, self.mid_epoch.noticed, state, self.say)
        started = time.perf_counter()
        report(self.ray, Report.partial(state, self.monitor, self.cfg.monitor_mode),
               self._write_checkpoint)
        self.mid_epoch.wrote(time.perf_counter() - started)
        state.position = None
        self.mid_epoch.restart_clock(global_step)
        self.say(f"checkpoint inside epoch {self.epoch}, after step {global_step} ({why})")

    def _write_checkpoint(self, d: Path) -> None:  # rank 0, with every report while training
        checkpoint.save_training(d, self.net.model, self.phase.optimizer, self.phase.scheduler,
                                 self.state, self.best_weights, self.ema)

    # ---- validate on every worker's shard (the averaged weights, with train.ema)

    def validate(self, epoch: int, totals, train_seconds: float) -> EpochMetrics:
        cfg, phase, state = self.cfg, self.phase, self.state
        with averaged_weights(self.net.model, self.ema):
            val = evaluate(phase.validated,
                           self.feeds.batches(self.shards, "val", phase.val_on_cache, cfg,
                                              self.device),
                           self.args.dataset.num_classes,
                           self.feeds.evaluation(phase.val_on_cache), self.amp, self.device,
                           self.ray.world)
            row = EpochMetrics(epoch=epoch, train_loss=totals.loss, train_acc=totals.acc,
                               val_loss=val.loss, val_acc=val.acc, val_auc=val.auc,
                               lr=phase.optimizer.param_groups[0]["lr"],
                               img_per_s=totals.seen / train_seconds,
                               epoch_seconds=time.perf_counter() - self.t0)
            if state.record(row, self.monitor, cfg.monitor_mode, cfg.train.patience,
                            cfg.train.epochs, cfg.tune.goal):
                self.best_weights, state.best_phase = _snapshot(self.net.model), phase.index
        return row

    # ---- checkpoint and report (rank 0 writes; every rank reports)

    def report_epoch(self, row: EpochMetrics) -> None:
        state = self.state
        report(self.ray, Report(row, self.monitor, state.best_epoch, state.best_value),
               self._write_checkpoint)
        self.mid_epoch.restart_clock(state.step)
        self.logger.log({**dataclasses.asdict(row), "phase": self.phase.index,
                         "workers": self.ray.world}, row.epoch)
        self.say(progress_line(row, self.cfg.train.epochs))

    def say_why_it_stopped(self, row: EpochMetrics) -> None:
        state, monitor = self.state, self.monitor
        self.say(f"early stopping: {monitor} {getattr(row, monitor):.4f} reached the goal "
                 f"{self.cfg.tune.goal:g}" if state.goal_reached else
                 f"early stopping: {monitor} has not improved for {state.bad_epochs} epochs "
                 f"(best {state.best_value:.4f} at epoch {state.best_epoch})")

    # ---- the best weights, tested once on the test split, in the final report

    def test_and_report(self) -> None:
        state, net, args = self.state, self.net, self.args
        restore_best(net, self.phases, state.best_phase, self.best_weights)
        test, tta = final_test(net.model, self.shards, self.feeds, args, self.device,
                               self.ray.world)
        state.trained, state.phase = True, state.best_phase  # how the saved weights freeze
        final = Report(state.best_row(), self.monitor, state.best_epoch, state.best_value,
                       final=True, test=TestMetrics(test.loss, test.acc, test.auc, test.rows),
                       stopped_early=state.stopped_early, epochs_run=state.epoch,
                       epochs_seconds=sum(r["epoch_seconds"] for r in state.history))
        report(self.ray, final, lambda d: checkpoint.save_final(
            d, net.model, state, final, test, args.dataset.classes, tta))
        self.logger.close()  # the driver logs the test metrics, linked to model and split


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
    dataset_shard: Callable  # dataset name -> this worker's part of it
    preemption_notice: Callable  # () -> Ray Train's PreemptionInfo, or None (a barrier)


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

        # No notices there: a Tune trial that loses its node is retried by Tune from its
        # last checkpoint (`train.checkpoint_every` bounds what that costs).
        return WorkerSession(0, 1, node_id, tune.report, tune.get_checkpoint, to_device,
                             tune.Checkpoint, ray.train.get_dataset_shard, lambda: None)
    ctx = ray.train.get_context()
    return WorkerSession(ctx.get_world_rank(), ctx.get_world_size(), node_id,
                         ray.train.report, ray.train.get_checkpoint,
                         ray.train.torch.prepare_model, ray.train.Checkpoint,
                         ray.train.get_dataset_shard, ray.train.get_preemption_info)


def setup_device(cfg, world: int) -> torch.device:
    """The worker's device, its CPU threads and cudnn's autotuner."""
    import ray.train.torch

    device = ray.train.torch.get_device()
    if on_gpu(device):
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(own_threads(cfg.scaling.cpus_per_worker))
    return device


@dataclass
class RunModel:
    """The run's network: the whole model (checkpointed, tested on images), where its frozen
    front is cut when the feature cache serves the first phase, and its coarse groups (the
    unit of freeze depth) as parameter names."""

    model: nn.Module
    info: ModelInfo
    split: ModelSplit | None
    groups: list[list[str]]


def setup_model(args: WorkerArgs, device) -> RunModel:
    """The model the plan checked: same seed, new head, the first phase's frozen groups
    (before DDP, so that DDP never tracks frozen parameters), cut where the cache was cut."""
    torch.manual_seed(args.config.train.seed)
    model, minfo = build_for_run(args.config, args.dataset, freeze="0")
    groups = [names for _, names in model_groups(model)]  # before anything is frozen
    depth = resolve_freeze(parse_schedule(args.config.model.freeze)[0].depth,
                           args.config.model.backbone, minfo.group_names)
    set_frozen_depth(model, groups, depth)
    split = None
    if args.cache is not None:
        split = split_model(model, minfo.data_config["input_size"])
        if split is None or split.cut != args.cache.cut:
            raise RuntimeError(f"the worker cut the model after {split and split.cut}, the "
                               f"plan after {args.cache.cut}: the plan and the worker disagree")
        load_front(args.cache.uri, split.front)  # the weights that computed the cache
        split.rest.to(device)
    return RunModel(model.to(device), minfo, split, groups)


def make_ema(model: nn.Module, cfg):
    """timm's running average of the weights (warmed up: early steps weigh more), or None."""
    if cfg.train.ema is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.train.ema, use_warmup=True)


def resume(found, model, phase: PhaseRun, ema, state: TrainingState, say,
           resized: bool = False) -> dict | None:
    """Restores a run Ray restarted (after a failure, or a resumed sweep) from `found`, in
    the phase its last epoch trained in; returns the best weights so far. `state` is the
    checkpoint's, already read (`checkpoint.peek`). Loaded after the move to the device, so
    the optimizer's state lands beside its parameters. After a resize the schedule is the new
    size's (its length in steps differs), not the checkpoint's."""
    if found is None:
        return None
    with found.as_directory() as d:
        _, best = checkpoint.load_training(Path(d), model, phase.optimizer,
                                           None if resized else phase.scheduler, ema)
    state.resumed += 1
    at = state.position
    say(f"resumed from the checkpoint of epoch {state.epoch}" if not at else
        f"resumed inside epoch {at['epoch']}, after its step {at['steps']} ({at['why']} "
        f"checkpoint)")
    return best


LAST_STEP_TAG = "preemption_last_step"  # the last step seen while a node was draining


def note_preemption(logger: EpochLogger, notice, state: TrainingState, say) -> None:
    """A preemption notice, in MLflow (rank 0): when, which nodes and ranks, the deadline,
    the step of its just-in-time checkpoint, and the count so far."""
    record = {"noticed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": state.step,
              "epoch": state.position["epoch"],
              "nodes": getattr(notice, "preempted_node_ids", []),
              "ranks": getattr(notice, "preempted_ranks", []),
              "deadline_ms": getattr(notice, "deadline_ms", None)}
    logger.tag(f"preemption_{state.preemptions}", json.dumps(record))
    logger.log({"preemptions": state.preemptions}, state.step)
    say(f"preemption notice for node(s) {', '.join(n[:8] for n in record['nodes'])}: "
        f"checkpoint now, training goes on until the node goes")


def note_resume(logger: EpochLogger, state: TrainingState, phases, say, written_at: int
                ) -> None:
    """After a restart: where it resumed (`written_at`, the checkpoint's step as its writers
    counted), and in MLflow (rank 0) the epochs the checkpoint holds that MLflow lacks (a
    run killed between its checkpoint and its log) and the steps a preemption cost."""
    state.resumed_at.append(written_at)
    if state.run_id == logger.run_id:  # a new run (a resumed sweep's trial) starts afresh
        logger.log_missing(state.history,
                           lambda row: {"phase": phase_at(phases, row["epoch"])})
    reached = logger.get_tag(LAST_STEP_TAG)
    if reached is not None and int(reached) >= written_at:
        lost = int(reached) - written_at
        logger.log({"preemption_steps_lost": lost}, state.preemptions)
        logger.tag(LAST_STEP_TAG, "")
        say(f"the preemption cost {lost} step(s) since its checkpoint")


# --------------------------------------------------------------------------- each epoch


@contextlib.contextmanager
def averaged_weights(model: nn.Module, ema):
    """Within: `model` holds the average of its weights (`train.ema`); after: its own."""
    if ema is None:
        yield
        return
    own = _snapshot(model)
    model.load_state_dict(ema.module.state_dict())
    try:
        yield
    finally:
        model.load_state_dict(own)


def report(ray_: WorkerSession, what: Report | dict,
           write_checkpoint: Callable[[Path], None]) -> None:
    """One report from every rank (a `Report`, or `Report.partial`'s metrics); rank 0 also
    writes the checkpoint that goes with it."""
    with tempfile.TemporaryDirectory() as tmp:
        found = None
        if ray_.rank == 0:
            write_checkpoint(Path(tmp))
            found = ray_.checkpoint_class.from_directory(tmp)
        ray_.report(what if isinstance(what, dict) else what.metrics(), checkpoint=found)


def restore_best(net: RunModel, phases, best_phase: int, best_weights: dict | None) -> None:
    """The best epoch's weights in the model, frozen as they were then (a frozen BatchNorm
    keeps other state than a live one)."""
    if best_weights is None:
        return
    depth = resolve_freeze(phases[best_phase].depth, net.info.backbone, net.info.group_names)
    set_frozen_depth(net.model, net.groups, depth)
    net.model.load_state_dict(best_weights)


def final_test(model: nn.Module, shards: dict, feeds: Feeds, args: WorkerArgs, device,
               world: int):
    """The whole model (a cached front joins the rest) on test images, with `model.tta`;
    with test-time augmentation, also without it, to say what it buys and costs."""
    cfg = args.config
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)

    def test(tta: str, keep: bool):
        started = time.perf_counter()
        result = evaluate(model, feeds.batches(shards, "test", False, cfg, device,
                                               with_ids=keep),
                          args.dataset.num_classes, feeds.images, autocast(cfg.train.amp, device),
                          device, world, keep=keep, tta=tta)
        return result, 1000 * (time.perf_counter() - started) / max(result.rows, 1)

    result, ms = test(cfg.model.tta, keep=True)
    if cfg.model.tta == "none":
        return result, {}
    plain, plain_ms = test("none", keep=False)
    return result, {"tta": cfg.model.tta, "ms_per_image": ms, "acc_without_tta": plain.acc,
                    "loss_without_tta": plain.loss, "ms_per_image_without_tta": plain_ms}


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


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
