"""The learning-rate range test (fastai's `lr_find`, Lightning's `LearningRateFinder`).

A short run on the real training data, on a Ray Train worker with the same model, feeds and
optimizer as training, whose learning rate grows exponentially from `START` to `END` over at
most `STEPS` steps (and never more than one epoch), the loss of every step recorded. The
loss is smoothed (an exponential moving average, bias-corrected) and the suggestion is the
middle of its longest valley, fastai's default: a rate where the loss still falls steadily,
below the point where it turns up. One curve per freeze depth (a schedule's first phase):
deep freezing wants other rates than full fine-tuning. The sweep's `tune.lr_min=auto` and
`tune.lr_max=auto` take their range from it (`range_from`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from tlray.config.schedule import Phase, first_depth
from tlray.train.feeds import Feeds, seed_epoch
from tlray.train.phases import enter_phase
from tlray.train.protocol import WorkerArgs
from tlray.train.steps import all_reduce, autocast, train_step

START, END, STEPS = 1e-6, 1.0, 100
SMOOTHING = 0.98  # of the loss's moving average
DIVERGED = 4.0  # the ramp stops once the smoothed loss is this many times its minimum
CURVES = "lr_find.json"


@dataclass
class Curve:
    """One freeze depth's test: each step's learning rate and (smoothed) loss."""

    freeze: str
    lrs: list[float]
    losses: list[float]  # smoothed
    raw: list[float]
    suggestion: float  # the middle of the longest valley
    steepest: float  # where the smoothed loss falls fastest (for comparison)

    @classmethod
    def from_losses(cls, freeze: str, lrs: list[float], raw: list[float]) -> Curve:
        smoothed, average = [], 0.0
        for i, loss in enumerate(raw, 1):
            average, debiased = smooth(average, loss, i)
            smoothed.append(debiased)
        # As fastai does, the suggestions leave out the first tenth (the average has seen
        # few losses yet, and the slope there is noise) and the last five steps.
        n = len(raw)
        kept = slice(n // 10, n - 5 if n > 20 else n)
        lrs_kept, kept_losses = lrs[kept], smoothed[kept]
        return cls(freeze, lrs, smoothed, raw, valley(lrs_kept, kept_losses),
                   steepest(lrs_kept, kept_losses))


def smooth(average: float, loss: float, i: int) -> tuple[float, float]:
    """One step of the exponential average of the loss: (the average, debiased for the
    `i` losses seen so far)."""
    average = SMOOTHING * average + (1 - SMOOTHING) * loss
    return average, average / (1 - SMOOTHING ** i)


def valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's suggestion: the middle of the longest run over which the loss keeps falling
    (the longest decreasing subsequence), a little towards its lower end."""
    n = len(losses)
    runs, start, end = [1] * n, 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and runs[i] < runs[j] + 1:
                runs[i] = runs[j] + 1
        if runs[end] < runs[i]:
            end, start = i, i - runs[i]
    third = (end - start) / 3
    return lrs[min(n - 1, max(0, start + int(third) + int(third / 2)))]


def steepest(lrs: list[float], losses: list[float]) -> float:
    """Where the smoothed loss falls fastest against log(lr)."""
    slopes = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
              for i in range(len(lrs) - 1)]
    return lrs[min(range(len(slopes)), key=slopes.__getitem__)] if slopes else lrs[0]


def range_from(curves: list[Curve], low: float | str, high: float | str
               ) -> tuple[float, float]:
    """A sweep's learning-rate range: `auto` ends a third below the lowest suggestion and
    three times above the highest (log-uniform: a factor of 9 around a single one)."""
    suggestions = [c.suggestion for c in curves]
    low = min(suggestions) / 3 if low == "auto" else float(low)
    high = max(suggestions) * 3 if high == "auto" else float(high)
    return low, max(low, high)


def lr_find(plan, freezes: list[str]) -> list[Curve]:
    """The range test for each freeze depth (or schedule: its first phase), on the plan's
    training images, with the plan's workers; one Ray Train run for all of them."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from tlray.data.ingest import worker_split_config
    from tlray.train.cluster import quiet_logging_config, worker_resources
    from tlray.train.in_driver import CheckpointKeeper, trains_in_driver
    from tlray.train.launch import read_splits, run_trainer, scaling_config

    cfg, s = plan.config, plan.config.scaling
    train = read_splits(cfg, plan.dataset, ["train"])["train"]
    args = WorkerArgs(config=cfg, dataset=plan.dataset, cache=None, run_id=None,
                      tracking_uri=plan.tracking_uri, label="lr-find")
    name = f"lr-find-{plan.dataset.name}"
    keeper = CheckpointKeeper(Path(plan.storage) / name, 1, "depths", "max") \
        if trains_in_driver(cfg) else None
    trainer = lambda: TorchTrainer(  # noqa: E731
        lr_find_per_worker, train_loop_config={"args": args, "freezes": list(freezes),
                                               "keeper": keeper},
        scaling_config=scaling_config(s, here=keeper is not None),
        run_config=ray.train.RunConfig(name=name, storage_path=plan.storage,
                                       logging_config=quiet_logging_config()),
        datasets={"train": train.randomize_block_order(seed=cfg.train.seed)},
        dataset_config=worker_split_config())
    with run_trainer(trainer, keeper, worker_resources(s)).as_directory() as d:
        return [Curve(**c) for c in json.loads((Path(d) / CURVES).read_text())]


def lr_find_per_worker(loop_config: dict) -> None:
    """The range test on one worker, for every depth in `loop_config["freezes"]` in turn."""
    from tlray.train.session import ray_session

    args: WorkerArgs = loop_config["args"]
    session = ray_session(args.in_trial_process, loop_config.get("keeper"))
    curves = []
    for freeze in loop_config["freezes"]:
        cfg = dataclasses.replace(args.config, model=dataclasses.replace(
            args.config.model, freeze=freeze), optim=dataclasses.replace(
            args.config.optim, lr=START, schedule="constant", warmup_epochs=0))
        curves.append(_ramp(dataclasses.replace(args, config=cfg), freeze, session))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if session.rank == 0:
            (Path(tmp) / CURVES).write_text(json.dumps([dataclasses.asdict(c) for c in curves]))
            checkpoint = session.checkpoint_class.from_directory(tmp)
        session.report({"depths": len(curves)}, checkpoint=checkpoint)


def _ramp(args: WorkerArgs, freeze: str, session) -> Curve:
    """One depth's ramp: the training step at a rising learning rate, every loss kept."""
    from tlray.train.worker_setup import setup_model

    cfg, device = args.config, session.device
    net = setup_model(args, device)
    feeds = Feeds.for_run(args, net.info)
    phase = enter_phase(0, [Phase(first_depth(freeze), None)], net, args,
                        session.prepare_model, steps_per_epoch=1, first_step=0,
                        world=session.world)
    shards = {"train": session.dataset_shard("train")}
    epoch_rows = args.dataset.splits["train"].rows / session.world
    steps = max(2, min(STEPS, math.ceil(epoch_rows / cfg.data.batch_size)))
    feed = feeds.train(phase.on_cache, cfg.train.seed, 1, session.rank)
    criterion, amp = nn.CrossEntropyLoss(), autocast(cfg.train.amp, device)
    lrs, losses, best, average = [], [], math.inf, 0.0
    phase.trained.train()
    batches = feeds.batches(shards, "train", phase.on_cache, cfg, device,
                            seed_epoch(cfg.train.seed, 1, session.rank))
    for i, (images, labels) in enumerate(batches):
        lr = START * (END / START) ** (i / (steps - 1))
        for group in phase.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        feed.seed_step(i + 1)
        _, loss = train_step(images, labels, i + 1, forward=phase.forward, criterion=criterion,
                             optimizer=phase.optimizer, scheduler=phase.scheduler, amp=amp,
                             feed=feed)
        loss = float(all_reduce(loss.detach().reshape(1), session.world)[0]) / session.world
        lrs.append(lr)
        losses.append(loss)
        average, smoothed = smooth(average, loss, i + 1)
        best = min(best, smoothed)
        if i + 1 >= steps or (i > 10 and smoothed > DIVERGED * best):
            break
    return Curve.from_losses(freeze, lrs, losses)


def log_curves(curves: list[Curve]) -> None:
    """The test's plot, curves and suggestions, on the active MLflow run."""
    import mlflow

    from tlray.track import plots
    from tlray.track.figures import log_figure

    log_figure(plots.lr_find_plot(curves), "plots/lr_find.png")
    mlflow.log_dict([dataclasses.asdict(c) for c in curves], "lr_find.json")
    mlflow.log_params({f"lr_find.freeze_{c.freeze}": f"{c.suggestion:.3g}" for c in curves})


def find_and_log(cfg) -> str:
    """`tlray lr-find`: the test of every depth `tune.freeze` tries (`auto`: every depth),
    logged as an MLflow run; returns what to print."""
    from tlray.config.schedule import choices
    from tlray.track.params import log_config
    from tlray.track.runs import start_run
    from tlray.track.store import ui_command
    from tlray.train.plan import preflight

    plan = preflight(cfg, plan_cache=False)
    n = len(plan.model.group_names)
    freezes = ([str(k) for k in range(n)] + ["all"] if cfg.tune.freeze == "auto"
               else list(dict.fromkeys(first_depth(c) for c in choices(cfg.tune.freeze))))
    with start_run(plan.experiment, run_name="lr-find",
                   tags={"kind": "lr-find", "dataset": plan.dataset.name,
                         "backbone": cfg.model.backbone}) as run:
        curves = lr_find(plan, freezes)
        log_config(plan.config.to_dict())
        log_curves(curves)
    low, high = range_from(curves, "auto", "auto")
    lines = [f"learning-rate range test on {plan.dataset.name} ({cfg.model.backbone}, "
             f"{cfg.data.image_size} px), {len(curves[0].lrs)} steps at most:"]
    lines += [f"  freeze {c.freeze:>4}: {c.suggestion:.2g} (the loss falls fastest at "
              f"{c.steepest:.2g})" for c in curves]
    lines += [f"a sweep's range (what --tune.lr_min auto --tune.lr_max auto take): "
              f"{low:.2g} .. {high:.2g}",
              f"plot: plots/lr_find.png of MLflow run {run.info.run_id} "
              f"({ui_command()})"]
    return "\n".join(lines)
