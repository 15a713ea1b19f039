"""What a sweep's epochs will cost, measured before it starts: a few training steps at each
depth its freeze choices train at, on the real data, with the model, input size,
augmentation and threads a trial gets; the budget plan (`tlray.tune.budget`) is built from it.

Each depth's epoch is its steps times the time of one step (after a warm-up step, which
pays for allocations and autotuning once), plus validation: the rows of the validation
split at the forward pass's cost. Where a trial at that depth could train from the feature
cache (its training images are not augmented, and the cache would be used: see
`feature_cache.choose`), the cache is timed too: its build (the frozen front over the
cached splits' rows) and an epoch trained from it; the plan then decides whether it pays.
What a trial pays around its epochs (a Tune trial's
start, the test, logging the model) and what the sweep pays around its trials cannot be
seen in a few steps: they are `TRIAL_START_S` and the like, measured on a 2-core laptop and
scaled by how fast this machine ran the steps against that one. The sweep replaces every
estimate with what it measures as trials end (`tlray.tune.replan`).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from tlray.config.augmentation import from_config as augmentation_from_config
from tlray.config.schedule import Phase, parse
from tlray.data.dataset import decode_images, read_shard
from tlray.model import feature_cache
from tlray.train.feeds import Feeds
from tlray.train.phases import enter_phase
from tlray.train.plan import Plan
from tlray.train.protocol import WorkerArgs
from tlray.train.steps import autocast, evaluate, make_optimizer, on_gpu, train_step
from tlray.train.threads import own_threads
from tlray.train.worker_setup import setup_model
from tlray.tune.makespan import Costs

STEPS = 3  # timed steps per depth, after one warm-up step
# Around a trial's epochs, measured with the main job on the 2-core laptop (December 2026,
# tf_efficientnet_lite0, 48 px): a reused trial process's start, the run's MLflow set-up and
# its data (TRIAL_START_S); the test, plots and metrics (TRIAL_FINISH_S); the sweep's Tune
# set-up before its first trial, and its pick, the pick's logged model (`tune.log_models`),
# its `mlflow.models.evaluate` and its registration after its last (SWEEP_START_S,
# SWEEP_END_S). REFERENCE_STEP_S is what one step of that run took there, the yardstick for
# scaling them to another machine.
TRIAL_START_S, TRIAL_FINISH_S, SWEEP_START_S, SWEEP_END_S = 4.0, 2.5, 4.0, 10.0
# A feature cache's build beyond its front's forward passes (the model built again, the
# shards read and written): what the first trial at a cached depth spends before training.
CACHE_BUILD_S = 2.0
REFERENCE_STEP_S = 0.25


def depths(choices: list[str]) -> list[str]:
    """Every depth the freeze choices train at (a schedule's phases too), shallowest first."""
    found = {phase.depth for choice in choices for phase in parse(choice)}
    return sorted(found, key=lambda d: (d == "all", int(d) if d != "all" else 0))


def calibrate(plan: Plan, choices: list[str], started_at: float) -> Costs:
    """Costs of the sweep `plan` runs over `choices`, measured now in this process.

    Args:
        started_at: `time.time()` when the command started: what it has taken until the
            measurement is done (its start, the preflight, this) is spent already.
    """
    cfg, info = plan.config, plan.dataset
    batch = _first_batch(info, cfg.data.batch_size)
    epoch_s, step_s, build_s, cached_epoch_s = {}, [], {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(own_threads(cfg.scaling.cpus_per_worker))
    try:
        for depth in depths(choices):
            epoch_s[depth], step, cache = _epoch_seconds(plan, depth, batch)
            step_s.append(step)
            if cache is not None:
                build_s[depth], cached_epoch_s[depth] = cache
    finally:
        torch.set_num_threads(threads)
    scale = max(0.5, min(4.0, float(np.median(step_s)) / REFERENCE_STEP_S))
    return Costs(epoch_s=epoch_s, trial_s=TRIAL_START_S * scale,
                 finish_s=TRIAL_FINISH_S * scale,
                 setup_s=time.time() - started_at + SWEEP_START_S * scale,
                 wrapup_s=SWEEP_END_S * scale,
                 cache_build_s={d: s + CACHE_BUILD_S * scale for d, s in build_s.items()},
                 cached_epoch_s=cached_epoch_s)


def _epoch_seconds(plan: Plan, depth: str,
                   batch) -> tuple[float, float, tuple[float, float] | None]:
    """(an epoch at `depth`, its steps and its validation; one step at `depth`; the feature
    cache's (build, epoch) there, or None where trials at `depth` would not train from it)."""
    cfg, info = plan.config, plan.dataset
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, freeze=depth))
    args = WorkerArgs(config=cfg, dataset=info, cache=None, run_id=None, tracking_uri=None)
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available()
                          else "cpu")
    with torch.random.fork_rng(devices=[]):
        net = setup_model(args, device)
        steps_per_epoch = max(1, math.ceil(info.splits["train"].rows / cfg.data.batch_size))
        phase = enter_phase(0, [Phase(depth, None)], net, args, lambda m: m.to(device),
                            steps_per_epoch=steps_per_epoch, first_step=0, world=1)
        feeds = Feeds.for_run(args, net.info)
        timing = _Timing(info, steps_per_epoch, autocast(cfg.train.amp, device), device,
                         *(t.to(device) for t in batch))
        epoch_s, step_s = timing.epoch(phase.forward, phase.validated, phase.optimizer,
                                       phase.scheduler, feeds.train(False, cfg.train.seed, 1, 0),
                                       feeds.images)
        cache = _cache_seconds(plan, net, feeds, timing)
    return epoch_s, step_s, cache


def _cache_seconds(plan: Plan, net, feeds: Feeds, timing: _Timing) -> tuple[float, float] | None:
    """(building the feature cache for `net`'s frozen front, an epoch trained from it), timed
    on one batch as a trial would do both; None where a trial would not train from it."""
    cfg, info = plan.config, plan.dataset
    if augmentation_from_config(cfg.data).enabled:  # augmented images: never from a cache
        return None
    cut, _ = feature_cache.choose(cfg.train.feature_cache, net.model,
                                  net.info.data_config["input_size"], info,
                                  cfg.data.cache_gb * 2**30)
    if cut is None:
        return None
    front = cut.front.eval()
    with torch.no_grad():
        features, front_s = timing.timed(lambda: front(feeds.images(timing.images)))[-1]
    optimizer, scheduler = make_optimizer(cut.rest, cfg.optim, 1, timing.steps_per_epoch)
    epoch_s, _ = dataclasses.replace(timing, images=features).epoch(
        cut.rest, cut.rest, optimizer, scheduler, feeds.features, feeds.features)
    rows = sum(info.splits[s].rows for s in feature_cache.CACHED_SPLITS)
    return rows * front_s / len(timing.labels), epoch_s


@dataclasses.dataclass
class _Timing:
    """Times training and validation on one batch, as an epoch of them would run."""

    info: object  # DatasetInfo: the split sizes
    steps_per_epoch: int
    amp: object
    device: torch.device
    images: torch.Tensor  # the batch: images, or the cached front's outputs for them
    labels: torch.Tensor

    def epoch(self, forward, validated, optimizer, scheduler, feed,
              eval_feed) -> tuple[float, float]:
        """(an epoch's steps and validation, one step) of `forward` trained on the batch."""
        criterion = torch.nn.CrossEntropyLoss()
        forward.train()
        steps = self.timed(lambda: train_step(
            self.images, self.labels, 1, forward=forward, criterion=criterion,
            optimizer=optimizer, scheduler=scheduler, amp=self.amp, feed=feed), STEPS + 1)
        step_s = float(np.median([s for _, s in steps[1:]]))  # the first one warms up
        # Also warmed up first: timed cold, validation read 1.5x the epoch.
        _, evaluated_s = self.timed(lambda: evaluate(
            validated, [(self.images, self.labels)], self.info.num_classes, eval_feed,
            self.amp, self.device))[-1]
        per_row = evaluated_s / len(self.labels)
        return (self.steps_per_epoch * step_s + self.info.splits["val"].rows * per_row,
                step_s)

    def timed(self, work, times: int = 2) -> list[tuple[object, float]]:
        """(result, seconds) of `work` done `times` times in a row."""
        out = []
        for _ in range(times):
            _sync(self.device)
            started = time.perf_counter()
            result = work()
            _sync(self.device)
            out.append((result, time.perf_counter() - started))
        return out


def _first_batch(info, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of real training rows (uint8 images, labels), from the first shards."""
    images, labels, rows = [], [], 0
    for uri in info.shard_uris("train"):
        table = read_shard(uri)
        images.append(decode_images(table.column("image"), info.image_shape))
        labels.append(table.column("label").to_numpy())
        rows += table.num_rows
        if rows >= batch_size:
            break
    x = np.concatenate(images)[:batch_size].copy()
    y = np.concatenate(labels)[:batch_size].astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def _sync(device: torch.device) -> None:
    if on_gpu(device):
        torch.cuda.synchronize(device)
