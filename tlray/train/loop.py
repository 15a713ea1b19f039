"""The per-worker training loop: what every Ray Train worker runs, top to bottom.

One call of `run_worker` is one worker of one training run (or a whole one-worker sweep
trial, run inside the Tune trial's own process and reporting to Tune). It gets its
`WorkerArgs` from the driver's plan and talks to Ray only through its `WorkerSession`
(`tlray.train.session`; the tests hand it a `LocalSession` instead). It builds the model
(frozen groups first, then DDP), resumes from the last checkpoint if Ray restarted it
(`tlray.train.worker_setup`), and trains epoch by epoch on its own shard of the data, phase
by phase when `model.freeze` is a schedule (`tlray.train.phases`). After every epoch the
metrics are reduced across workers and reported with a checkpoint. When training ends (or
stops early: patience, a sweep's goal, or a budgeted sweep's deadline, `tlray.train.deadline`)
the best weights are tested on the test split and the final report carries them; the driver
logs it to MLflow.

Every random draw of an epoch (data order, augmentation, dropout) follows from
(train.seed, epoch, step, rank), so a run resumed from a checkpoint trains exactly as if it
had never stopped. With `train.ema`, a running average of the weights is what is validated,
kept as the best and tested. Only rank 0 writes checkpoints, logs to MLflow and prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from tlray.model.freeze import resolve_freeze, set_frozen_depth
from tlray.train import checkpoint, faults
from tlray.train.deadline import out_of_time
from tlray.train.feeds import seed_epoch
from tlray.train.position import (LAST_STEP_TAG, PREEMPTION, Position, note_preemption,
                                  position_in)
from tlray.train.progress import EpochTicker, progress_bar, progress_line
from tlray.train.protocol import EpochMetrics, Report, TestMetrics, WorkerArgs
from tlray.train.session import WorkerSession, ray_session
from tlray.train.steps import (RunningTotals, autocast, evaluate, on_gpu, reduce_totals,
                               train_step)
from tlray.train.threads import borrowed_threads
from tlray.train.worker_setup import EpochStart, WorkerRun, setup


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry point: `loop_config["args"]` is the worker's `WorkerArgs`."""
    args = loop_config["args"]
    run_worker(args, ray_session(args.in_trial_process, loop_config.get("keeper")))


def run_worker(args: WorkerArgs, session: WorkerSession) -> None:
    """One worker of one run, against `session` (Ray's, or a `LocalSession`)."""
    run = setup(args, session)  # model, data, optimizer; resumed if Ray restarted it
    for epoch in run.epochs_left():
        run.enter_phase_of(epoch)  # a freeze schedule's next phase, when one begins
        totals, seconds = train_epoch(run, epoch)  # this worker's shard, reduced over all
        row = validate(run, epoch, totals, seconds)  # every worker's shard, the best kept
        report_epoch(run, row)  # checkpoint (rank 0 writes), MLflow, the epoch's line
        if run.state.stopped_early:
            run.say(why_it_stopped(run, row))
            break
        if epoch < run.cfg.train.epochs and out_of_time(
                run.args.deadline, run.cfg.model.freeze, run.state.history,
                run.session.world, run.device):  # a budgeted sweep's trial: no time left
            run.state.stopped_early = True
            run.say(run.args.deadline.describe(time.time()))
            break
    finish(run)  # the best weights on the test split, in the final report


def train_epoch(run: WorkerRun, epoch: int):
    """One epoch on this worker's shard, from where a checkpoint inside it left off when the
    run resumed there; returns the epoch's totals, reduced over the workers, and its seconds."""
    cfg, session, state, phase = run.cfg, run.session, run.state, run.phase
    at = position_in(state.position, epoch)
    skip = at.steps_to_skip(session.world) if at else 0  # steps the resumed part already ran
    run.current = EpochStart(epoch, state.step - skip,
                             time.perf_counter() - (at.seconds if at else 0.0))
    state.position = None
    if not on_gpu(run.device) and session.world == 1 and cfg.scaling.borrow_idle_cpus:
        torch.set_num_threads(borrowed_threads(cfg.scaling.cpus_per_worker))
    # The epoch's data order and dropout follow from (seed, epoch, rank); each step's
    # augmentation and dropout from (seed, epoch, step, rank): see `feeds.seed_step`.
    order = seed_epoch(cfg.train.seed, epoch, session.rank)
    feed = run.feeds.train(phase.on_cache, cfg.train.seed, epoch, session.rank)
    batches = run.feeds.batches(run.shards, "train", phase.on_cache, cfg, run.device, order,
                                skip=skip)
    running = RunningTotals(run.device, at.totals() if at and session.rank == 0 else None)
    ticker = EpochTicker(epoch, cfg.train.epochs, run.args.dataset.splits["train"].rows,
                         None if run.args.interactive or session.rank else run.say,
                         run.current.started)
    phase.trained.train()
    with _join(phase.trained), progress_bar(run.args.interactive and session.rank == 0,
                                            run.steps_per_epoch, epoch,
                                            cfg.train.epochs) as bar:
        for images, labels in batches:
            state.step += 1
            feed.seed_step(state.step)
            logits, loss = train_step(
                images, labels, state.step - phase.first_step, forward=phase.forward,
                criterion=run.criterion, optimizer=phase.optimizer, scheduler=phase.scheduler,
                amp=run.amp, feed=feed)
            running.add(loss, logits, labels)
            if run.ema is not None:
                run.ema.update(run.net.model, step=state.step)
            bar.update(1)
            ticker.tick(running.seen * session.world)
            faults.maybe_fail(run.args.fault, session.rank, state.step, run.args.restart_key,
                              session.world)
            maybe_checkpoint_inside_epoch(run, running)
    seconds = time.perf_counter() - run.current.started
    return reduce_totals(running.snapshot(), session.world, run.device), seconds


def maybe_checkpoint_inside_epoch(run: WorkerRun, running: RunningTotals) -> None:
    """A checkpoint with the position in the epoch (`tlray.train.position`) when one is due.
    While a node drains, MLflow also holds the last step reached (checked), so the resumed
    run can log what the preemption cost. Every rank calls it after every step."""
    step = run.state.step
    why = run.mid_epoch.due(step)
    if why is not None:
        checkpoint_inside_epoch(run, why, running)
    if run.mid_epoch.noticed is not None and (
            why is not None or step % run.mid_epoch.check_every == 0):
        run.logger.tag(LAST_STEP_TAG, str(step))


def checkpoint_inside_epoch(run: WorkerRun, why: str, running: RunningTotals) -> None:
    state, world, start = run.state, run.session.world, run.current
    totals = reduce_totals(running.snapshot(), world, run.device)
    state.position = Position(start.epoch, state.step - start.first_step, world,
                              totals.loss_sum, totals.correct, totals.seen,
                              time.perf_counter() - start.started, why).to_dict()
    if why == PREEMPTION:
        state.preemptions += 1
        note_preemption(run.logger, run.mid_epoch.noticed, state, run.say)
    began = time.perf_counter()
    report(run, Report.partial(state, run.cfg.train.monitor, run.cfg.monitor_mode))
    run.mid_epoch.wrote(time.perf_counter() - began)
    state.position = None
    run.mid_epoch.restart_clock(state.step)
    run.say(f"checkpoint inside epoch {start.epoch}, after step {state.step} ({why})")


def validate(run: WorkerRun, epoch: int, totals, train_seconds: float) -> EpochMetrics:
    """The epoch's row: validation on every worker's shard (the averaged weights, with
    `train.ema`); the best weights so far are kept (on the CPU) when it is the best."""
    cfg, phase, state = run.cfg, run.phase, run.state
    with averaged_weights(run.net.model, run.ema):
        val = evaluate(phase.validated,
                       run.feeds.batches(run.shards, "val", phase.val_on_cache, cfg, run.device),
                       run.args.dataset.num_classes, run.feeds.evaluation(phase.val_on_cache),
                       run.amp, run.device, run.session.world)
        row = EpochMetrics(epoch=epoch, train_loss=totals.loss, train_acc=totals.acc,
                           val_loss=val.loss, val_acc=val.acc, val_auc=val.auc,
                           lr=phase.optimizer.param_groups[0]["lr"],
                           img_per_s=totals.seen / train_seconds,
                           epoch_seconds=time.perf_counter() - run.current.started)
        if state.record(row, cfg.train.monitor, cfg.monitor_mode, cfg.train.patience,
                        cfg.train.epochs, run.args.goal):
            run.best_weights, state.best_phase = _snapshot(run.net.model), phase.index
    return row


def report_epoch(run: WorkerRun, row: EpochMetrics) -> None:
    """The epoch's report with its checkpoint (rank 0 writes), MLflow's row, the console's."""
    state, monitor = run.state, run.cfg.train.monitor
    report(run, Report(row, monitor, state.best_epoch, state.best_value))
    run.mid_epoch.restart_clock(state.step)
    run.logger.log({**dataclasses.asdict(row), "phase": run.phase.index,
                    "workers": run.session.world}, row.epoch)
    run.say(progress_line(row, run.cfg.train.epochs))


def why_it_stopped(run: WorkerRun, row: EpochMetrics) -> str:
    state, monitor = run.state, run.cfg.train.monitor
    if state.goal_reached:
        return (f"early stopping: {monitor} {getattr(row, monitor):.4f} reached the goal "
                f"{run.args.goal:g}")
    return (f"early stopping: {monitor} has not improved for {state.bad_epochs} epochs "
            f"(best {state.best_value:.4f} at epoch {state.best_epoch})")


def finish(run: WorkerRun) -> None:
    """The best weights, tested once on the test split; the final report and checkpoint."""
    state, net, args = run.state, run.net, run.args
    restore_best(run)
    test, tta = final_test(run)
    state.trained, state.phase = True, state.best_phase  # how the saved weights freeze
    final = Report(state.best_row(), run.cfg.train.monitor, state.best_epoch, state.best_value,
                   final=True, test=TestMetrics(test.loss, test.acc, test.auc, test.rows),
                   stopped_early=state.stopped_early, epochs_run=state.epoch,
                   epochs_seconds=sum(r["epoch_seconds"] for r in state.history))
    report(run, final, lambda d: checkpoint.save_final(d, net.model, state, final, test,
                                                       args.dataset.classes, tta))
    run.logger.close()  # the driver logs the test metrics, linked to model and split


# --------------------------------------------------------------------------- helpers


def report(run: WorkerRun, what: Report | dict,
           write_checkpoint: Callable[[Path], None] | None = None) -> None:
    """One report from every rank (a `Report`, or `Report.partial`'s metrics); rank 0 also
    writes the checkpoint that goes with it (by default, the training checkpoint)."""
    session = run.session
    write = write_checkpoint or run.write_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        found = None
        if session.rank == 0:
            write(Path(tmp))
            found = session.checkpoint_class.from_directory(tmp)
        session.report(what if isinstance(what, dict) else what.metrics(), checkpoint=found)


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


def restore_best(run: WorkerRun) -> None:
    """The best epoch's weights in the model, frozen as they were then (a frozen BatchNorm
    keeps other state than a live one)."""
    if run.best_weights is None:
        return
    net = run.net
    depth = resolve_freeze(run.phases[run.state.best_phase].depth, net.info.backbone,
                           net.info.group_names)
    set_frozen_depth(net.model, net.groups, depth)
    net.model.load_state_dict(run.best_weights)


def final_test(run: WorkerRun):
    """The whole model (a cached front joins the rest) on test images, with `model.tta`;
    with test-time augmentation, also without it, to say what it buys and costs."""
    cfg, model, feeds = run.cfg, run.net.model, run.feeds
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)

    def test(tta: str, keep: bool):
        started = time.perf_counter()
        result = evaluate(model, feeds.batches(run.shards, "test", False, cfg, run.device,
                                               with_ids=keep),
                          run.args.dataset.num_classes, feeds.images,
                          autocast(cfg.train.amp, run.device), run.device, run.session.world,
                          keep=keep, tta=tta)
        return result, 1000 * (time.perf_counter() - started) / max(result.rows, 1)

    result, ms = test(cfg.model.tta, keep=True)
    if cfg.model.tta == "none":
        return result, {}
    plain, plain_ms = test("none", keep=False)
    return result, {"tta": cfg.model.tta, "ms_per_image": ms, "acc_without_tta": plain.acc,
                    "loss_without_tta": plain.loss, "ms_per_image_without_tta": plain_ms}


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _join(model):
    """DDP's join(): workers with fewer batches shadow the collectives of the others."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.join()
    return contextlib.nullcontext()
