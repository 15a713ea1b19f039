"""The per-worker training loop: what every Ray Train worker runs, top to bottom.

One call of `train_loop_per_worker` is one worker of one training run (or a whole one-worker
sweep trial, run inside the Tune trial's own process and reporting to Tune). It builds the model
(frozen groups first, then DDP), resumes from the last checkpoint if Ray restarted it, trains
epoch by epoch on its own shard of the data, and after every epoch reduces the validation
metrics across workers and reports them to Ray with a checkpoint. When training ends (or
stops early) it restores the best weights and evaluates the test split; the last report
carries the best model and the test results, which the driver logs to MLflow.

Only rank 0 writes checkpoints, logs metrics to MLflow and prints progress.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tlray import augment, metrics
from tlray import config as config_mod
from tlray.datasets import load_info
from tlray.features import cache_key, split_model
from tlray.ingest import iter_image_batches
from tlray.models import build_model
from tlray.preprocess import to_model_input
from tlray.session import quiet_train_worker
from tlray.threads import borrowed_threads, own_threads

SAMPLE_IMAGES = 36  # test images kept for the predictions grid
TEST_PREDICTIONS = "test_predictions.csv"  # every test row: id, label, class, prob_<class>


@dataclass
class LoopState:
    """Everything besides tensors that a resumed run needs; saved as JSON in checkpoints."""

    epoch: int = 0  # next epoch to run
    step: int = 0  # optimizer steps so far
    best: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the monitored metric last improved
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    resumed: int = 0  # times this run was restored from a checkpoint after a failure
    trained: bool = False  # every epoch done (the final checkpoint): only the test remains


def train_loop_per_worker(loop_config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    # DDP's note that depthwise-conv gradients are laid out differently from its buckets is
    # about a copy, not about correctness; keep it out of the per-epoch output.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    quiet_train_worker()
    cfg = config_mod.from_plain(loop_config["config"])
    info = load_info(loop_config["dataset_uri"])
    session = worker_session(loop_config.get("report_to_tune", False))
    # A sweep's trials print side by side: each line says whose it is.
    say = functools.partial(say_line, label=loop_config.get("progress_label"))
    rank, world = session.rank, session.world
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.train.seed)
    borrow = not cuda and world == 1 and cfg.scaling.borrow_idle_cpus
    if not cuda:
        torch.set_num_threads(own_threads(cfg.scaling.cpus_per_worker))
    if cuda:
        torch.backends.cudnn.benchmark = True

    # Model: new head, frozen groups (before DDP, so DDP never tracks frozen parameters).
    model, minfo = build_model(
        cfg.model.backbone, info.num_classes, in_chans=info.channels,
        img_size=cfg.data.image_size, weights=cfg.model.weights,
        head=cfg.model.head, freeze=cfg.model.freeze, drop_rate=cfg.model.drop_rate)
    size = (cfg.data.image_size, cfg.data.image_size)
    channels_last = cfg.train.channels_last  # NHWC convolutions: faster on GPUs and CPUs

    # With a feature cache, val batches are the frozen front's outputs, and only the rest of
    # the model (which shares its parameters) runs; train batches too, unless training images
    # are augmented (they change every epoch: the whole model trains on them). See
    # tlray.features and tlray.augment.
    augmentation = augment.from_config(cfg.data)
    fed_info, split = info, None
    if loop_config.get("features_uri"):
        fed_info = load_info(loop_config["features_uri"])
        split = split_model(model, minfo.data_config["input_size"])
        key = split and cache_key(split, info, minfo.data_config, cfg.data.image_size)
        if key != fed_info.fingerprint:  # another cut, or other frozen weights
            raise RuntimeError(f"feature cache {fed_info.uri} does not match this model "
                               f"(cut at {split.cut if split else 'nowhere'})")
    feed_images = functools.partial(to_model_input, mean=minfo.data_config["mean"],
                                    std=minfo.data_config["std"], size=size,
                                    channels_last=channels_last)
    feed_features = functools.partial(features_input, channels_last=channels_last)
    train_on_cache = split is not None and not augmentation.enabled
    train_info = fed_info if train_on_cache else info
    feed_train = feed_features if train_on_cache else functools.partial(
        feed_images, augment=augment.Augmenter(augmentation, cfg.train.seed, rank)
        if augmentation.enabled else None)
    feed_val = feed_features if split else feed_images

    steps_per_epoch = max(1, math.ceil(info.splits["train"].rows / world / cfg.data.batch_size))
    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch)
    state = LoopState()
    best_weights = None

    # `net` is what trains (DDP-wrapped when world > 1); `model` is the whole model, whose
    # weights are checkpointed and which evaluates the test split on images.
    net = session.prepare_model(split.rest if train_on_cache else model)  # to the device
    trained = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
    validated = split.rest if split else trained  # on the device too, with `net`

    # Resume: Ray hands back the last reported checkpoint after a worker failure. Loaded
    # after the move to the device, so the optimizer's state lands beside its parameters.
    checkpoint = session.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state, best_weights = load_training_state(Path(d), model, optimizer, scheduler)
        state.resumed += 1
        if rank == 0:
            say(f"resumed from the checkpoint of epoch {state.epoch}")
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    forward = torch.compile(net) if cfg.train.compile else net
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and cfg.train.amp)
    step = functools.partial(train_step, forward=forward, criterion=criterion,
                             optimizer=optimizer, scheduler=scheduler, amp=amp, feed=feed_train)

    shards = {name: ray.train.get_dataset_shard(name) for name in ("train", "val", "test")}
    logger = EpochLogger(loop_config.get("mlflow_run_id"), loop_config.get("tracking_uri"),
                         enabled=rank == 0)
    show_bar = rank == 0 and loop_config.get("interactive", False)
    logger.tag("train_node_ids", ",".join(sorted(set(_gather(
        ray.get_runtime_context().get_node_id(), world)))))

    for epoch in range(state.epoch, cfg.train.epochs if not state.trained else 0):
        # ---- train one epoch on this worker's shard ----
        if borrow:
            torch.set_num_threads(borrowed_threads(cfg.scaling.cpus_per_worker))
        net.train()
        t0 = time.perf_counter()
        sums = torch.zeros(2, device=device)  # loss * n, correct: kept on the device, so
        seen = 0  # no step waits for the GPU; the row count is known on the host anyway
        batches = iter_image_batches(shards["train"], train_info.image_shape,
                                     cfg.data.batch_size, dtype=train_info.dtype,
                                     device=device, shuffle=cfg.data.shuffle)
        # Long epochs say how far they are (rank 0 speaks for all: it sees 1/world of them).
        ticker = EpochTicker(epoch + 1, cfg.train.epochs, info.splits["train"].rows,
                             say if rank == 0 and not show_bar else None, t0)
        with _join(net), _progress(show_bar, steps_per_epoch, epoch, cfg.train.epochs) as bar:
            for images, labels in batches:
                state.step += 1
                logits, loss = step(images, labels, state.step)
                sums += torch.stack([loss.detach() * len(labels),
                                     (logits.argmax(1) == labels).sum().float()])
                seen += len(labels)
                bar.update(1)
                ticker.tick(seen * world)
                if rank == cfg.train.kill_rank and state.step == cfg.train.kill_at_step:
                    _die_once(loop_config["restart_key"])  # test-only: see TrainConfig
        train_seconds = time.perf_counter() - t0
        totals = torch.cat([sums, torch.tensor([float(seen)], device=device)])
        loss_sum, correct, seen = _all_reduce(totals, world).tolist()

        # ---- validate on every worker's shard, then combine ----
        val = evaluate(validated, shards["val"], fed_info, cfg, feed_val, amp, device, world)
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "val_loss": val["loss"], "val_acc": val["acc"], "val_auc": val["auc"],
            "lr": optimizer.param_groups[0]["lr"],
            "img_per_s": seen / train_seconds,
            "epoch_seconds": time.perf_counter() - t0,
        }
        state.history.append(row)
        state.epoch = epoch + 1
        if _improved(row[cfg.train.monitor], state.best, cfg.monitor_mode):
            state.best, state.best_epoch, state.bad_epochs = row[cfg.train.monitor], epoch + 1, 0
            best_weights = {k: v.detach().to("cpu", copy=True)
                            for k, v in model.state_dict().items()}
        else:
            state.bad_epochs += 1
        state.stopped_early = bool(cfg.train.patience and state.bad_epochs >= cfg.train.patience
                                   and state.epoch < cfg.train.epochs)

        # ---- checkpoint + report (rank 0 writes; every rank reports) ----
        row_report = {**row, "best_epoch": state.best_epoch,
                      f"best_{cfg.train.monitor}": state.best}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_training_state(Path(tmp), model, optimizer, scheduler, state, best_weights)
                ckpt = session.checkpoint_class.from_directory(tmp)
            session.report(row_report, checkpoint=ckpt)
        logger.log(row, epoch + 1)
        if rank == 0:
            say(progress_line(row, cfg.train.epochs, cfg.train.monitor))
        if state.stopped_early:
            if rank == 0:
                say(f"early stopping: {cfg.train.monitor} has not improved for "
                    f"{state.bad_epochs} epochs (best {state.best:.4f} at epoch "
                    f"{state.best_epoch})")
            break

    # ---- the best weights, evaluated once on the test split ----
    if best_weights is not None:
        model.load_state_dict(best_weights)
    model.to(device)  # with a feature cache, the front joins the rest for the test on images
    if channels_last:
        model.to(memory_format=torch.channels_last)
    test = evaluate(model, shards["test"], info, cfg, feed_images, amp, device, world, keep=True)
    best_row = state.history[state.best_epoch - 1] if state.best_epoch else state.history[-1]
    final = {**best_row, "best_epoch": state.best_epoch,
             f"best_{cfg.train.monitor}": state.best, "stopped_early": state.stopped_early,
             "epochs_run": state.epoch,
             "epochs_seconds": sum(r["epoch_seconds"] for r in state.history),
             **{f"test_{k}": v for k, v in test.items() if k in ("loss", "acc", "auc")}}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            state.trained = True
            save_final(Path(tmp), model, state, test, info.classes)
            ckpt = session.checkpoint_class.from_directory(tmp)
        session.report(final, checkpoint=ckpt)
    logger.close()  # the driver logs the test metrics, linked to the model and the test split


class WorkerSession(NamedTuple):
    """What the loop needs from Ray, wherever it runs."""

    rank: int
    world: int
    report: Callable  # (metrics, checkpoint=...)
    get_checkpoint: Callable
    prepare_model: Callable  # to the device, DDP-wrapped when world > 1
    checkpoint_class: type


def worker_session(in_tune_process: bool) -> WorkerSession:
    """Ray Train's worker APIs, or Ray Tune's in a Tune trial's own process.

    There (Train's local mode) the loop talks to Tune itself: local mode keeps reports to
    itself rather than passing them (and their checkpoints) on, and Ray refuses
    `ray.train.get_context` (which `prepare_model` calls) inside a Tune function. With one
    process there is nothing to wrap in DDP: preparing a model is moving it to the device.
    """
    import ray.train
    import ray.train.torch

    if in_tune_process:
        from ray import tune

        def to_device(model: nn.Module) -> nn.Module:
            return model.to(ray.train.torch.get_device())

        return WorkerSession(0, 1, tune.report, tune.get_checkpoint, to_device, tune.Checkpoint)
    ctx = ray.train.get_context()
    return WorkerSession(ctx.get_world_rank(), ctx.get_world_size(), ray.train.report,
                         ray.train.get_checkpoint, ray.train.torch.prepare_model,
                         ray.train.Checkpoint)


def train_step(batch: torch.Tensor, labels: torch.Tensor, step: int, *, forward, criterion,
               optimizer, scheduler, amp, feed):
    """One optimizer step (the loop's and its benchmark baseline's).

    `feed` turns the batch (uint8 images, or cached features) into the model's input.
    """
    x = feed(batch)
    with amp:
        logits = forward(x)
        loss = criterion(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step_update(num_updates=step)
    return logits, loss


def features_input(features: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
    """Cached features are the model's input as they are (channels_last for conv maps)."""
    if channels_last and features.ndim == 4:
        return features.contiguous(memory_format=torch.channels_last)
    return features


def make_optimizer(model: nn.Module, cfg, steps_per_epoch: int):
    """timm's optimizer factory (weight decay groups, layer decay) and its cosine schedule."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    o = cfg.optim
    extra = {"momentum": o.momentum} if o.name == "sgd" else {}
    optimizer = create_optimizer_v2(model, opt=o.name, lr=o.lr, weight_decay=o.weight_decay,
                                    layer_decay=o.layer_decay, **extra)
    if o.schedule == "constant" and o.warmup_epochs == 0:
        return optimizer, None
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine" if o.schedule == "cosine" else "step",
        num_epochs=cfg.train.epochs, decay_epochs=10 ** 9, decay_rate=1.0,  # step = constant
        min_lr=o.min_lr, warmup_lr=o.lr * 0.01, warmup_epochs=o.warmup_epochs,
        step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return optimizer, scheduler


@torch.no_grad()
def evaluate(model: nn.Module, shard, info, cfg, feed, amp, device, world: int,
             keep: bool = False) -> dict:
    """Loss, accuracy and AUC over every worker's part of a split, identical on all ranks.

    The unwrapped model is used so that no DDP collective runs per batch: workers may hold
    different numbers of rows. Labels and probabilities are gathered once at the end (AUC
    needs all of them). With `keep`, every row's id and probabilities and a few images come
    back too.
    """
    was_training = model.training
    model.eval()
    losses, labels_all, probs_all, images_kept, ids = [], [], [], [], []
    for images, labels, *batch_ids in iter_image_batches(shard, info.image_shape,
                                                         cfg.data.batch_size, dtype=info.dtype,
                                                         device=device, with_ids=keep):
        with amp:
            logits = model(feed(images)).float()
        losses.append(F.cross_entropy(logits, labels, reduction="sum"))
        labels_all.append(labels.cpu())
        probs_all.append(logits.softmax(1).cpu())
        if keep:
            ids.extend(batch_ids[0])
            if sum(len(i) for i in images_kept) < SAMPLE_IMAGES:
                images_kept.append(images[:SAMPLE_IMAGES].cpu())
    model.train(was_training)
    loss_sum = torch.stack(losses).sum() if losses else torch.zeros((), device=device)
    labels_np = torch.cat(labels_all).numpy() if labels_all else np.zeros(0, np.int64)
    probs_np = torch.cat(probs_all).numpy() if probs_all else np.zeros((0, info.num_classes),
                                                                       np.float32)
    if world > 1:
        loss_sum = _all_reduce(loss_sum.reshape(1), world)[0]
        gathered = [None] * world
        dist.all_gather_object(gathered, (labels_np, probs_np, ids))
        labels_np = np.concatenate([g[0] for g in gathered])
        probs_np = np.concatenate([g[1] for g in gathered])
        ids = [i for g in gathered for i in g[2]]
    out = {"loss": float(loss_sum) / max(len(labels_np), 1),
           "acc": metrics.accuracy(labels_np, probs_np),
           "auc": metrics.auc(labels_np, probs_np), "rows": len(labels_np)}
    if keep:
        preds = probs_np.argmax(1)
        out["confusion"] = metrics.confusion_matrix(labels_np, preds, info.num_classes)
        out["predictions"] = (ids, labels_np, probs_np)
        kept = torch.cat(images_kept).numpy()[:SAMPLE_IMAGES] if images_kept else None
        # Rank 0's own rows come first in the gathered arrays, so they line up with `kept`.
        out["samples"] = (kept, labels_np[:len(kept)] if kept is not None else None,
                          preds[:len(kept)] if kept is not None else None)
    return out


def save_training_state(d: Path, model, optimizer, scheduler, state: LoopState,
                        best_weights) -> None:
    torch.save(model.state_dict(), d / "model.pt")
    torch.save(optimizer.state_dict(), d / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), d / "scheduler.pt")
    if best_weights is not None and state.best_epoch != state.epoch:
        torch.save(best_weights, d / "best_model.pt")
    (d / "state.json").write_text(json.dumps(asdict(state)))


def load_training_state(d: Path, model, optimizer, scheduler):
    """Restores model, optimizer, schedule and loop state; returns (state, best weights).

    The final checkpoint (`save_final`, e.g. a trial killed while its model was being
    logged) holds the best weights and no optimizer: training is over, the test remains.
    """
    model.load_state_dict(torch.load(d / "model.pt", map_location="cpu", weights_only=True))
    state = LoopState(**json.loads((d / "state.json").read_text()))
    if state.trained:
        return state, {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer.load_state_dict(torch.load(d / "optimizer.pt", map_location="cpu",
                                         weights_only=True))
    if scheduler is not None and (d / "scheduler.pt").exists():
        scheduler.load_state_dict(torch.load(d / "scheduler.pt", weights_only=True))
    best_file = d / "best_model.pt" if (d / "best_model.pt").exists() else d / "model.pt"
    best = torch.load(best_file, map_location="cpu", weights_only=True)
    return state, best


def save_final(d: Path, model, state: LoopState, test: dict, classes: list[str]) -> None:
    """The final checkpoint: best weights, the epoch history and the test results, with
    every test row's probabilities (`test_predictions.csv`: what serving must reproduce)."""
    torch.save(model.state_dict(), d / "model.pt")
    (d / "state.json").write_text(json.dumps(asdict(state)))
    cm = test["confusion"]
    (d / "test.json").write_text(json.dumps({
        "loss": test["loss"], "acc": test["acc"], "auc": test["auc"], "rows": test["rows"],
        "classes": classes, "confusion_matrix": cm.tolist(),
        "per_class_acc": dict(zip(classes, metrics.per_class_accuracy(cm).tolist()))}))
    ids, labels, probs = test["predictions"]
    table = {"id": ids, "label": [classes[i] for i in labels],
             "class": [classes[i] for i in probs.argmax(1)],
             **{f"prob_{c}": probs[:, k] for k, c in enumerate(classes)}}
    pd.DataFrame(table).to_csv(d / TEST_PREDICTIONS, index=False, float_format="%.9g")
    images, labels, preds = test["samples"]
    if images is not None:
        np.savez(d / "test_samples.npz", images=images, labels=labels, preds=preds)


def say_line(line: str, label: str | None = None) -> None:
    """One line to the console, after `label: ` when there is one; not `print`, which Ray
    Train tees into a duplicate line."""
    sys.stdout.write(f"{label + ': ' if label else ''}{line}\n")
    sys.stdout.flush()


class EpochTicker:
    """A progress line for long epochs: once an epoch has run `after_s`, at most one every
    `every_s`, with the images done, the rate and the epoch's ETA. An epoch shorter than
    `after_s` says nothing but its end-of-epoch line."""

    def __init__(self, epoch: int, epochs: int, total: int, say: Callable | None,
                 start: float, *, after_s: float = 20.0, every_s: float = 15.0,
                 clock: Callable[[], float] = time.perf_counter):
        self.epoch, self.epochs, self.total, self.say = epoch, epochs, total, say
        self.start, self.after_s, self.every_s, self.clock = start, after_s, every_s, clock
        self.next_at = start + after_s

    def tick(self, done: int) -> None:
        """`done`: images of this epoch trained so far, all workers together."""
        if self.say is None:
            return
        now = self.clock()
        if now < self.next_at:
            return
        self.next_at = now + self.every_s
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        self.say(f"epoch {self.epoch}/{self.epochs}  {min(done, self.total):,}/{self.total:,} "
                 f"images  {rate:,.0f} img/s  ETA {format_seconds(eta)}")


def format_seconds(seconds: float) -> str:
    """12s, 3m05s, 1h02m: a duration as a person reads it."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(row: dict, epochs: int, monitor: str) -> str:
    return (f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  "
            f"train_acc {row['train_acc']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_acc {row['val_acc']:.4f}  val_auc {row['val_auc']:.4f}  "
            f"{row['img_per_s']:,.0f} img/s  {row['epoch_seconds']:.1f}s")


class EpochLogger:
    """Per-epoch metrics to MLflow from rank 0, buffered so a tracking outage loses nothing.

    A failed write (e.g. the MLflow server restarting) keeps the rows and retries them with
    the next epoch and, finally, with a few pauses at the end of the run.
    """

    def __init__(self, run_id: str | None, tracking_uri: str | None, enabled: bool):
        self.enabled = enabled and run_id is not None
        self.run_id, self.pending = run_id, []
        if self.enabled:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri)

    def log(self, values: dict, step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in values.items()
                         if isinstance(v, (int, float)) and math.isfinite(float(v))]
        self.flush()

    def tag(self, key: str, value: str) -> None:
        """A run tag, e.g. the Ray nodes the workers ran on; best effort."""
        if self.enabled:
            try:
                self.client.set_tag(self.run_id, key, value)
            except Exception as e:  # noqa: BLE001 - a tag is not worth failing a run for
                sys.stderr.write(f"could not set MLflow tag {key} ({type(e).__name__})\n")

    def flush(self) -> bool:
        try:
            for start in range(0, len(self.pending), 500):
                self.client.log_batch(self.run_id, metrics=self.pending[start:start + 500])
        except Exception as e:  # noqa: BLE001 - any tracking failure is retried later
            sys.stderr.write(f"MLflow unavailable ({type(e).__name__}); keeping "
                             f"{len(self.pending)} metric value(s) to retry\n")
            return False
        self.pending = []
        return True

    def close(self, attempts: int = 10, pause: float = 3.0) -> None:
        for _ in range(attempts):
            if not self.enabled or not self.pending or self.flush():
                return
            time.sleep(pause)


def _die_once(restart_key: str) -> None:
    """Test-only: this worker process dies (SIGKILL) mid-epoch, once per run.

    Waits until Ray Train has registered every checkpoint reported so far, so that what is
    being tested is the resume, not a race with the controller; a marker file keeps the
    restarted workers alive.
    """
    import ray.train

    marker = Path(tempfile.gettempdir()) / f"tlray-killed-{restart_key}"
    if marker.exists():
        return
    ray.train.get_all_reported_checkpoints()
    marker.touch()
    os.kill(os.getpid(), signal.SIGKILL)


def _improved(value: float, best: float | None, mode: str) -> bool:
    if value is None or not math.isfinite(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


def _gather(value, world: int) -> list:
    """Every rank's `value`, on every rank."""
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress(show: bool, total: int, epoch: int, epochs: int):
    if not show:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                mininterval=1.0, file=sys.stdout)


def _join(model):
    """DDP's join(): workers with fewer batches shadow the collectives of the others."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.join()
    return _NullBar()
