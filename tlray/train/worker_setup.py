"""A worker's set-up, step by step: device, model, state (resumed when Ray restarted the run),
optimizer, data, logging; `setup` calls them in that order and returns a `WorkerRun`.

Each step returns what it builds. The order matters where it says so: the model is seeded
and frozen before anything moves it, the checkpoint's state is read before the model is
frozen as its phase froze it, and its tensors are loaded after the move to the device so
that the optimizer's state lands beside its parameters.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from tlray.config.interval import parse_every
from tlray.config.schedule import Phase, phase_at
from tlray.config.schedule import parse as parse_schedule
from tlray.model.build import ModelInfo, build_for_run
from tlray.model.freeze import model_groups, resolve_freeze, set_frozen_depth
from tlray.model.cut import ModelCut, cut_model
from tlray.model.feature_cache import load_front
from tlray.track.epoch_log import EpochLogger
from tlray.train import checkpoint
from tlray.train.checkpoint import TrainingState
from tlray.train.feeds import Feeds
from tlray.train.phases import PhaseRun, enter_phase
from tlray.train.position import LAST_STEP_TAG, MidEpochCheckpoints, rescale_steps
from tlray.train.progress import say_line
from tlray.train.protocol import WorkerArgs, dataset_names
from tlray.train.session import WorkerSession
from tlray.train.steps import autocast, gather, on_gpu
from tlray.train.threads import own_threads


@dataclass
class RunModel:
    """The run's network: the whole model (checkpointed, tested on images), where its frozen
    front is cut when the feature cache serves the first phase, and its coarse groups (the
    unit of freeze depth) as parameter names."""

    model: nn.Module
    info: ModelInfo
    cut: ModelCut | None
    groups: list[list[str]]


@dataclass
class EpochStart:
    """Where the epoch in progress began: what a checkpoint inside it and its figures
    count from."""

    epoch: int
    first_step: int  # the global step count before its first step
    started: float  # perf_counter() at its start (earlier by what a resumed part had run)


@dataclass
class WorkerRun:
    """Everything one worker holds through its run, as `setup` built it."""

    args: WorkerArgs
    session: WorkerSession
    say: Callable[[str], None]  # a console line (rank 0; the others say nothing)
    amp: torch.autocast
    criterion: nn.Module
    net: RunModel
    feeds: Feeds
    phases: list[Phase]
    steps_per_epoch: int
    state: TrainingState
    ema: object | None  # timm's ModelEmaV3 with `train.ema`
    phase: PhaseRun  # the phase training is in: what is frozen, what trains, its optimizer
    best_weights: dict | None  # the best epoch's weights so far, on the CPU
    shards: dict  # dataset name -> this worker's part
    logger: EpochLogger
    mid_epoch: MidEpochCheckpoints
    current: EpochStart | None = field(default=None)

    @property
    def cfg(self):
        return self.args.config

    @property
    def device(self) -> torch.device:
        return self.session.device

    def epochs_left(self) -> range:
        return range(self.state.epoch + 1,
                     self.cfg.train.epochs + 1 if not self.state.trained else 0)

    def enter_phase_of(self, epoch: int) -> None:
        """A freeze schedule's next phase, when `epoch` begins one."""
        index = phase_at(self.phases, epoch)
        if index != self.phase.index:
            self.phase = self.enter(index, first_step=self.state.step)
            self.state.phase, self.state.phase_start_step = index, self.state.step

    def write_checkpoint(self, d: Path) -> None:
        """The training checkpoint (rank 0, with every report while training)."""
        checkpoint.save_training(d, self.net.model, self.phase.optimizer, self.phase.scheduler,
                                 self.state, self.best_weights, self.ema)

    def enter(self, index: int, first_step: int) -> PhaseRun:
        return enter_phase(index, self.phases, self.net, self.args,
                           self.session.prepare_model, steps_per_epoch=self.steps_per_epoch,
                           first_step=first_step, world=self.session.world, ema=self.ema)


def setup(args: WorkerArgs, session: WorkerSession) -> WorkerRun:
    """The worker's run, built in order; resumed from the checkpoint Ray hands back, if any."""
    cfg = args.config
    say = functools.partial(say_line, label=args.label) if session.rank == 0 else _silent
    setup_threads(cfg, session.device)
    net = setup_model(args, session.device)
    phases = parse_schedule(cfg.model.freeze, cfg.train.epochs)
    found = session.get_checkpoint()
    state = checkpoint.peek(found) or TrainingState()
    written_at = state.step  # in steps of the workers that wrote the checkpoint
    resized = rescale_steps(state, session.world)  # an elastic run, restarted resized
    ema = make_ema(net.model, cfg)
    run = WorkerRun(
        args=args, session=session, say=say, amp=autocast(cfg.train.amp, session.device),
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing), net=net,
        feeds=Feeds.for_run(args, net.info), phases=phases,
        steps_per_epoch=max(1, math.ceil(
            args.dataset.splits["train"].rows // session.world / cfg.data.batch_size)),
        state=state, ema=ema, phase=None, best_weights=None,
        shards={name: session.dataset_shard(name)
                for name in dataset_names(args.cache, len(phases))},
        logger=setup_logger(args, session),
        mid_epoch=MidEpochCheckpoints(parse_every(cfg.train.checkpoint_every),
                                      cfg.scaling.notice_check_every, session.preemption_notice,
                                      session.world, session.device))
    run.phase = run.enter(state.phase, first_step=state.phase_start_step)
    if found is not None:
        run.best_weights = resume(found, run, resized)
        note_resume(run, written_at)
    state.run_id = args.run_id
    run.mid_epoch.restart_clock(state.step)
    return run


def setup_threads(cfg, device: torch.device) -> None:
    """The CPU threads a CPU worker computes with (its CPUs), or cudnn's autotuner on a GPU."""
    if on_gpu(device):
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(own_threads(cfg.scaling.cpus_per_worker))


def setup_model(args: WorkerArgs, device) -> RunModel:
    """The model the plan checked: same seed, new head, the first phase's frozen groups
    (before DDP, so that DDP never tracks frozen parameters), cut where the cache was cut."""
    torch.manual_seed(args.config.train.seed)
    model, minfo = build_for_run(args.config, args.dataset, freeze="0")
    groups = [names for _, names in model_groups(model)]  # before anything is frozen
    depth = resolve_freeze(parse_schedule(args.config.model.freeze)[0].depth,
                           args.config.model.backbone, minfo.group_names)
    set_frozen_depth(model, groups, depth)
    cut = None
    if args.cache is not None:
        cut = cut_model(model, minfo.data_config["input_size"])
        if cut is None or cut.after != args.cache.cut:
            raise RuntimeError(f"the worker cut the model after {cut and cut.after}, the "
                               f"plan after {args.cache.cut}: the plan and the worker disagree")
        load_front(args.cache.uri, cut.front)  # the weights that computed the cache
        cut.rest.to(device)
    return RunModel(model.to(device), minfo, cut, groups)


def make_ema(model: nn.Module, cfg):
    """timm's running average of the weights (warmed up: early steps weigh more), or None."""
    if cfg.train.ema is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.train.ema, use_warmup=True)


def setup_logger(args: WorkerArgs, session: WorkerSession) -> EpochLogger:
    """Rank 0's per-epoch MLflow logging, and the nodes every worker runs on (a tag)."""
    logger = EpochLogger(args.run_id, args.tracking_uri, enabled=session.rank == 0)
    logger.tag("train_node_ids", ",".join(sorted(set(gather(session.node_id, session.world)))))
    return logger


def resume(found, run: WorkerRun, resized: bool = False) -> dict | None:
    """Restores a run Ray restarted (after a failure, or a resumed sweep) from `found`, in
    the phase its last epoch trained in; returns the best weights so far. After a resize the
    schedule is the new size's (its length in steps differs), not the checkpoint's."""
    phase, state = run.phase, run.state
    with found.as_directory() as d:
        _, best = checkpoint.load_training(Path(d), run.net.model, phase.optimizer,
                                           None if resized else phase.scheduler, run.ema)
    state.resumed += 1
    at = state.position
    run.say(f"resumed from the checkpoint of epoch {state.epoch}" if not at else
            f"resumed inside epoch {at['epoch']}, after its step {at['steps']} ({at['why']} "
            f"checkpoint)")
    return best


def note_resume(run: WorkerRun, written_at: int) -> None:
    """After a restart: where it resumed (`written_at`, the checkpoint's step as its writers
    counted), and in MLflow (rank 0) the epochs the checkpoint holds that MLflow lacks (a
    run killed between its checkpoint and its log) and the steps a preemption cost."""
    state, logger = run.state, run.logger
    state.resumed_at.append(written_at)
    if state.run_id == logger.run_id:  # a new run (a resumed sweep's trial) starts afresh
        logger.log_missing(state.history,
                           lambda row: {"phase": phase_at(run.phases, row["epoch"])})
    reached = logger.get_tag(LAST_STEP_TAG)
    if reached is not None and int(reached) >= written_at:
        lost = int(reached) - written_at
        logger.log({"preemption_steps_lost": lost}, state.preemptions)
        logger.tag(LAST_STEP_TAG, "")
        run.say(f"the preemption cost {lost} step(s) since its checkpoint")


def _silent(line: str) -> None:
    pass
