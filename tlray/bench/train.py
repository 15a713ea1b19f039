"""Training-loop benchmark: tlray's Ray Train loop against a plain PyTorch loop, side by side.

Both sides train the same model with the same optimizer and schedule, built by the run's own
set-up (`plain_loop.plain_model`: head and its init, weights, the first phase's frozen
groups), on the same batch, input size and synthetic uint8 images, on whatever device is
present, and the ratio of their train images/s says what tlray's machinery costs:

- plain: one process, the images held in host memory as one uint8 array (pinned on CUDA),
  each batch a zero-copy slice that is moved to the device and normalised/resized there by
  `tlray.train.steps.train_step` (the loop's own step), channels_last, and bf16 autocast on CUDA.
  No metrics, no shuffling, no checkpoints: the floor any training loop has to pay.
- tlray: exactly what a user runs, `train(preflight(cfg))`: the images prepared as a
  Parquet dataset, read by Ray Data, trained by `tlray.train.loop.train_loop_per_worker` in Ray
  Train workers, with MLflow logging (the logged model is switched off). Its figure is the
  `img_per_s` each epoch reports: train rows / time of the epoch's training part (batches
  from Ray Data, forward, backward, optimizer; validation, checkpoints and MLflow fall
  outside it).

- ingest: the same train split, read as the run reads it and handed to one worker through
  Ray Train's split of the dataset, iterated into uint8 batches on the worker's device with
  nothing else to do (`ingest_pass`). Divided by one worker's training rate, it says how much
  faster the data arrives than the model consumes it (`ingest_headroom`).

Fairness: each side is timed on the same number of steps per pass; the first pass (plain:
`warmup` steps; tlray: the first epoch) is left out and the headline figure of each side is
the best of the following passes (the plain ones half before, half after the tlray run).
The plain loop runs in a process of its own with what a Ray worker process gets, which the
benchmark asks a Ray worker with the same CPUs for:

- threads: Ray gives a worker `OMP_NUM_THREADS = max(1, floor(CPUs of the worker))` unless
  that variable is already set (torch then caps it at the cores it may use), and on CPU
  `tlray.train.loop` sets `torch.set_num_threads(round(cpus_per_worker))` (at least 1) itself, so a
  worker with the default `cpus_per_worker=1` trains on ONE thread where a plain process
  would take every core. `--threads N` gives each worker N CPUs, hence N threads (and no
  more: the benchmark turns `scaling.borrow_idle_cpus` off).
- priority: Ray starts worker processes at niceness 15 (`RAY_worker_niceness`). On an idle
  machine that changes nothing; on one busy with other work a niceness-15 worker gets a
  much smaller share of the CPU than a niceness-0 process, which is not a cost of tlray's
  loop, so the plain process runs at the workers' niceness too.

With `workers > 1` the tlray figure is all workers together against one plain process, so the
ratio then also shows how training scales (on CPU, give the cluster the cores for it).

The data are stored at `data_size` pixels and resized on the device to `image_size`, as
tlray does with every dataset (MNIST's 28 px is trained at 32-224 px); on CUDA the default
224 px input is fed from 64 px images, which keeps the synthetic dataset small.

The data and the plain side are `tlray.bench.plain_loop`'s; the result and its printing,
`tlray.bench.train_report`'s.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time

import torch

from tlray import config as config_mod
from tlray.bench.plain_loop import plain_process, sync, synthetic_images
from tlray.bench.train_report import TrainBenchResult, device_name
from tlray.train.threads import own_threads

CPU_DEFAULTS = dict(backbone="tf_efficientnet_lite0", weights="packaged", image_size=32,
                    batch_size=64, steps=100, epochs=3, warmup=10)
CUDA_DEFAULTS = dict(backbone="efficientnet_b0", weights="none", image_size=224,
                     batch_size=256, steps=100, epochs=3, warmup=30)


# ---------------------------------------------------------------------------------------
# tlray's path


def _worker_process_settings() -> tuple[int, int]:
    import os as os_

    import torch as t

    return t.get_num_threads(), os_.nice(0)


def ray_worker_settings(cpus: float) -> tuple[int, int]:
    """(torch intra-op threads, niceness) of a Ray worker process that holds `cpus` CPUs.

    Ray sets OMP_NUM_THREADS = max(1, floor(cpus)) in the worker unless it is already set
    in the environment the worker inherits (torch reads it when it loads), and starts every
    worker process at niceness `RAY_worker_niceness` (15 by default).
    """
    import ray

    remote = ray.remote(_worker_process_settings).options(num_cpus=cpus)
    threads, nice = ray.get(remote.remote())
    return int(threads), int(nice)


def tlray_run(cfg: config_mod.Config, workdir: str):
    """`train(preflight(cfg))` with MLflow, Ray results and artifacts kept in `workdir`."""
    from tlray.train.plan import preflight
    from tlray.train.run import train

    saved = {k: os.environ.get(k) for k in ("TLRAY_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["TLRAY_HOME"] = workdir  # MLflow artifacts go under it
    try:
        return train(preflight(cfg), run_name="bench-train")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ingest_pass(cfg_dict: dict, passes: int, cuda: bool) -> list[float]:
    """Ray task: images/s of `passes` passes over the train split as one Train worker gets
    it (`launch.read_splits`, then a one-way `streaming_split`), into uint8 batches on the
    device, shuffled as in training; nothing is computed on them."""
    import ray.data

    from tlray.data.dataset import load_info
    from tlray.data.ingest import iter_image_batches
    from tlray.train.launch import read_splits

    ray.data.DataContext.get_current().enable_progress_bars = False  # a task's own context
    cfg = config_mod.from_plain(cfg_dict)
    info = load_info(cfg.data.dataset)
    device = torch.device("cuda" if cuda else "cpu")
    train = read_splits(cfg, info, ("train",))["train"]
    (shard,) = train.streaming_split(1, equal=False)
    rates = []
    for _ in range(passes):
        sync(device)
        t0, rows = time.perf_counter(), 0
        for images, _ in iter_image_batches(shard, info.image_shape, cfg.data.batch_size,
                                            device=device, shuffle=torch.Generator()):
            rows += len(images)
        sync(device)
        rates.append(rows / (time.perf_counter() - t0))
    return rates


def ingest_rates(cfg: config_mod.Config, passes: int, cuda: bool) -> list[float]:
    """`ingest_pass` in a Ray task holding one training worker's CPUs (and GPU)."""
    import ray

    task = ray.remote(ingest_pass).options(num_cpus=cfg.scaling.cpus_per_worker,
                                           num_gpus=1 if cuda else 0)
    return ray.get(task.remote(cfg.to_dict(), passes, cuda))


# ---------------------------------------------------------------------------------------
# Both, side by side


def bench_config(*, dataset: str, backbone: str, weights: str, image_size: int,
                 batch_size: int, epochs: int, workers: int, cpus_per_worker: float,
                 use_gpu: bool, workdir: str, overrides: list[str] | None = None
                 ) -> config_mod.Config:
    """The run's config: tlray's defaults, the benchmark's settings, then `overrides`."""
    base = [f"--data.dataset={dataset}", f"--model.backbone={backbone}",
            f"--model.weights={weights}", f"--data.image_size={image_size}",
            f"--data.batch_size={batch_size}", f"--train.epochs={epochs}",
            f"--scaling.num_workers={workers}", f"--scaling.cpus_per_worker={cpus_per_worker}",
            f"--scaling.use_gpu={str(use_gpu).lower()}", "--tracking.log_model=false",
            # Both sides on the same threads: the plain loop cannot borrow idle CPUs.
            "--scaling.borrow_idle_cpus=false",
            # In Ray Train workers, as on a cluster (what the plain side is set up against):
            # one worker on a one-node laptop would otherwise train in this process.
            "--scaling.in_driver_process=false",
            "--tracking.experiment=tlray-bench-train",
            f"--tracking.tracking_uri=sqlite:///{workdir}/mlflow.db",
            f"--storage_path={workdir}/ray_results"]
    return config_mod.load(None, base + list(overrides or []))


def train_benchmark(*, backbone: str | None = None, weights: str | None = None,
                    image_size: int | None = None, data_size: int | None = None,
                    batch_size: int | None = None, steps: int | None = None,
                    epochs: int | None = None, warmup: int | None = None, workers: int = 1,
                    threads: int | None = None, device: str = "auto",
                    overrides: list[str] | None = None, seed: int = 0,
                    workdir: str | None = None, notice_checks: bool = False
                    ) -> TrainBenchResult:
    """Measures both sides on the same synthetic data; see the module docstring.

    Unset options take the device's defaults (`CPU_DEFAULTS` / `CUDA_DEFAULTS`).

    Args:
        steps: timed steps per plain pass, and optimizer steps per tlray epoch (per worker).
        epochs: tlray epochs; the plain loop runs `epochs - 1` timed passes (at least 1),
            half of them before the tlray run and half after.
        threads: CPUs per Ray worker (default: tlray's `cpus_per_worker`, 1); the plain
            loop uses as many torch threads as such a worker gets.
        overrides: `--section.key=value` settings applied to both sides (e.g.
            `--model.freeze=all`, `--train.amp=false`, `--data.shuffle=false`).
        workdir: where the dataset, MLflow store and Ray results go (default: a temporary
            directory removed afterwards).
        notice_checks: also time what asking Ray Train for a preemption notice costs: the
            tlray run never asks, and a second one asks after every step.
    """
    from tlray.data.pixel_sources import from_arrays
    from tlray.data.prepare import prepare
    from tlray.train.cluster import init_ray

    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    d = CUDA_DEFAULTS if cuda else CPU_DEFAULTS
    backbone = backbone or d["backbone"]
    weights = weights or (d["weights"] if backbone == d["backbone"] else "none")
    image_size = image_size or d["image_size"]
    data_size = data_size or min(image_size, 64)
    batch_size = batch_size or d["batch_size"]
    steps = steps or d["steps"]
    epochs = epochs or d["epochs"]
    warmup = d["warmup"] if warmup is None else warmup
    cpus = float(threads) if threads else config_mod.ScalingConfig().cpus_per_worker

    load_start = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tlray-bench-"))
        images, labels, fractions = synthetic_images(steps * batch_size * workers, data_size,
                                                     seed)
        info = prepare(from_arrays(images, labels), f"{workdir}/data", fractions=fractions,
                       seed=seed, progress=False)
        cfg = bench_config(dataset=info.uri, backbone=backbone, weights=weights,
                           image_size=image_size, batch_size=batch_size, epochs=epochs,
                           workers=workers, cpus_per_worker=cpus, use_gpu=cuda,
                           workdir=workdir, overrides=[
                               *(overrides or []),
                               *(["--scaling.notice_check_every=1000000000"]
                                 if notice_checks else [])])

        # A local cluster gets one spare logical CPU beyond the workers', so Ray Data's read
        # tasks (0.25 CPU each) never wait behind workers that hold every CPU.
        init_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(workers * cpus) + 1))
        n_threads, worker_nice = ray_worker_settings(cpus)
        if not cuda:
            # tlray.train.loop then sets the worker's threads itself, from the CPUs it holds.
            n_threads = own_threads(cfg.scaling.cpus_per_worker)
        train_rows = steps * batch_size * workers
        del images, labels  # the plain process makes the same ones from the seed
        # The plain passes are split around the tlray run, so that a machine getting busier
        # or quieter meanwhile does not favour one side.
        passes = max(1, epochs - 1)
        plain_args = dict(train_rows=train_rows, data_size=data_size, seed=seed, steps=steps,
                          warmup=warmup, device="cuda" if cuda else "cpu", threads=n_threads,
                          nice=worker_nice)
        plain, plain_nice = plain_process(cfg, info, passes=(passes + 1) // 2, **plain_args)

        t0 = time.perf_counter()
        result = tlray_run(cfg, workdir)
        wall = time.perf_counter() - t0
        ingest = ingest_rates(cfg, max(2, epochs), cuda)
        if passes // 2:
            plain += plain_process(cfg, info, passes=passes // 2, **plain_args)[0]
        history = result.history
        rates = [row["img_per_s"] for row in history]
        notice = 0.0
        if notice_checks:
            asking = tlray_run(config_mod.load(None, ["scaling.notice_check_every=1"],
                                               base=cfg), workdir)
            notice = max(row["img_per_s"] for row in asking.history[1:] or asking.history)
        return TrainBenchResult(
            device=device_name(cuda), backbone=backbone, weights=cfg.model.weights,
            image_size=image_size, data_size=data_size, batch_size=batch_size,
            workers=workers, threads=n_threads, nice=worker_nice, plain_nice=plain_nice,
            steps=steps,
            plain_img_s=max(plain), tlray_img_s=max(rates[1:] or rates),
            plain_passes_img_s=plain, tlray_epochs_img_s=rates,
            tlray_epoch_seconds=[row["epoch_seconds"] for row in history], tlray_wall_s=wall,
            ingest_img_s=max(ingest[1:]), ingest_passes_img_s=ingest,
            load_avg=[load_start, os.getloadavg()[0]], notice_img_s=notice)
