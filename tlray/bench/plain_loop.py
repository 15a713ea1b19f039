"""The training benchmark's baseline: synthetic images, and a plain single-process PyTorch loop
over them that trains the run's own model (see `tlray.bench.train` for what is compared and why
the loop runs in a child process at the Ray workers' niceness)."""

from __future__ import annotations

import functools
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn

from tlray import config as config_mod
from tlray.data.preprocess import to_model_input
from tlray.train.steps import autocast, train_step

NUM_CLASSES = 10
# Train gets almost all rows: tlray evaluates val every epoch and test at the end, outside
# the timed part, and they only have to exist.
VAL_FRACTION = 0.02


def synthetic_images(train_rows: int, side: int, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Random uint8 RGB images (N, side, side, 3), labels, and split fractions that put
    exactly `train_rows` rows into train (rounded up to whole classes) and ~2% each into val
    and test (at least one row per class)."""
    per_class = math.ceil(train_rows / NUM_CLASSES)
    held_out = max(1, round(per_class * VAL_FRACTION / (1 - 2 * VAL_FRACTION)))
    n = per_class + 2 * held_out
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (NUM_CLASSES * n, side, side, 3), dtype=np.uint8)
    labels = np.arange(NUM_CLASSES * n) % NUM_CLASSES
    fractions = {"train": per_class / n, "val": held_out / n, "test": held_out / n}
    return images, labels, fractions


def plain_model(cfg: config_mod.Config, info, device: torch.device | str):
    """The model, optimizer and schedule a run's first phase trains with, built by the run's
    own set-up (`tlray.train.worker_setup.setup_model`, `tlray.train.phases.enter_phase`):
    the same head and its init, frozen groups, optimizer and schedule as the tlray side, so
    that the ratio compares loops and not models."""
    from tlray.config.schedule import parse as parse_schedule
    from tlray.train.phases import enter_phase
    from tlray.train.protocol import WorkerArgs
    from tlray.train.worker_setup import setup_model

    args = WorkerArgs(config=cfg, dataset=info, cache=None, run_id=None, tracking_uri=None)
    net = setup_model(args, device)
    steps = max(1, math.ceil(info.splits["train"].rows / cfg.data.batch_size))
    return net, enter_phase(0, parse_schedule(cfg.model.freeze, cfg.train.epochs), net, args,
                            lambda module: module.to(device), steps_per_epoch=steps,
                            first_step=0, world=1)


def plain_loop(cfg: config_mod.Config, info, images: np.ndarray, labels: np.ndarray, *,
               steps: int, passes: int, warmup: int, device: torch.device | str,
               threads: int | None = None) -> list[float]:
    """A plain single-process loop on in-memory uint8 images; train images/s of each pass.

    Same model, optimizer/schedule, batch, input size and device-side preprocessing as
    `tlray.train.loop` (`plain_model`); batches are consecutive slices of `images`
    (N, H, W, C), wrapping around. `warmup` untimed steps come first, then `passes` timed
    passes of `steps` steps each.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    batch = cfg.data.batch_size
    if len(images) < batch:
        raise ValueError(f"need at least one batch of images ({batch}), got {len(images)}")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        if cuda:
            torch.backends.cudnn.benchmark = True
        net, phase = plain_model(cfg, info, device)
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        amp = autocast(cfg.train.amp, device)
        feed = functools.partial(to_model_input, mean=net.info.data_config["mean"],
                                 std=net.info.data_config["std"],
                                 size=(cfg.data.image_size,) * 2,
                                 channels_last=cfg.train.channels_last)
        host_images = torch.from_numpy(images)
        host_labels = torch.from_numpy(labels.astype(np.int64))
        if cuda:
            host_images, host_labels = host_images.pin_memory(), host_labels.pin_memory()
        n_batches = len(images) // batch
        step = 0

        def one_step() -> None:
            nonlocal step
            start = (step % n_batches) * batch
            step += 1
            train_step(host_images[start:start + batch].to(device, non_blocking=True),
                       host_labels[start:start + batch].to(device, non_blocking=True),
                       step, forward=phase.forward, criterion=criterion,
                       optimizer=phase.optimizer, scheduler=phase.scheduler, amp=amp,
                       feed=feed)

        phase.trained.train()
        for _ in range(warmup):
            one_step()
        rates = []
        for _ in range(passes):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                one_step()
            sync(device)
            rates.append(steps * batch / (time.perf_counter() - t0))
        return rates
    finally:
        torch.set_num_threads(old_threads)


def sync(device: torch.device) -> None:
    """Waits for the device's queued work, so that a clock reading means it is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plain_child(cfg_dict: dict, info, train_rows: int, data_size: int, seed: int,
                 steps: int, passes: int, warmup: int, device: str, threads: int, nice: int
                 ) -> tuple[list[float], int]:
    """The plain loop in a fresh process at the Ray workers' niceness (and thread count)."""
    current = os.nice(0)
    if nice > current:
        current = os.nice(nice - current)
    images, labels, _ = synthetic_images(train_rows, data_size, seed)
    rates = plain_loop(config_mod.from_plain(cfg_dict), info, images, labels, steps=steps,
                       passes=passes, warmup=warmup, device=device, threads=threads)
    return rates, current


def plain_process(cfg: config_mod.Config, info, *, train_rows: int, data_size: int, seed: int,
                  steps: int, passes: int, warmup: int, device: str, threads: int,
                  nice: int) -> tuple[list[float], int]:
    """Runs `plain_loop` in a spawned child process; returns its rates and niceness.

    A Ray worker runs at a lower priority than the driver (niceness 15): on a machine that
    is busy with other work it gets a smaller share of the CPU than a plain process would,
    which is not a cost of tlray's loop. The plain loop therefore runs at the same niceness
    (which a process can raise but not lower again, hence the child). Like any `spawn`ed
    process it re-imports the caller's main module: call this from a `__main__` guard.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_plain_child, cfg.to_dict(), info, train_rows, data_size, seed,
                           steps, passes, warmup, device, threads, nice).result()
