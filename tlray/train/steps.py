"""The arithmetic of training, free of Ray: one optimizer step, the running totals of an epoch,
one evaluation.

The per-worker loop (`tlray.train.loop`) and the training benchmark's plain baseline both
call these, and the tests run them on a tiny timm model with tensors in a list. Batches are
`(inputs, labels)` or `(inputs, labels, ids)`; a `feed` turns inputs (uint8 images, or a
feature cache's activations) into what the model takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tlray.data.preprocess import tta_probabilities
from tlray.track import metrics

SAMPLE_IMAGES = 36  # test images kept for the predictions grid


@dataclass
class EpochTotals:
    """One worker's (or, reduced, every worker's) training epoch in numbers."""

    loss_sum: float
    correct: float
    seen: int

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def acc(self) -> float:
        return self.correct / max(self.seen, 1)


def on_gpu(device) -> bool:
    return torch.device(device).type == "cuda"


def autocast(amp: bool, device) -> torch.autocast:
    """bf16 autocast where `amp` is on and the device is a GPU; a no-op on a CPU. Training,
    evaluation, the lr range test and the benchmark share it so they run at one precision."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and on_gpu(device))


@dataclass
class Evaluation:
    """Loss, accuracy and AUC over a whole split, identical on every rank; with `keep`,
    also the confusion matrix, every row's probabilities and a few images."""

    loss: float
    acc: float
    auc: float
    rows: int
    confusion: np.ndarray | None = None
    predictions: tuple[list, np.ndarray, np.ndarray] | None = None  # ids, labels, probs
    samples: tuple = (None, None, None)  # images, labels, predictions of the first rows


def train_step(batch: torch.Tensor, labels: torch.Tensor, step: int, *, forward, criterion,
               optimizer, scheduler, amp, feed):
    """One optimizer step; `step` is the global step count after it (the schedule's clock)."""
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


class RunningTotals:
    """An epoch's sums so far, kept on the device so that no step waits for the GPU; read
    (`snapshot`) only when a mid-epoch checkpoint needs them."""

    def __init__(self, device, start: EpochTotals | None = None):
        start = start or EpochTotals(0.0, 0.0, 0)
        self.sums = torch.tensor([start.loss_sum, start.correct], device=device)
        self.seen = start.seen

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.sums += torch.stack([loss.detach() * len(labels),
                                  (logits.argmax(1) == labels).sum().float()])
        self.seen += len(labels)

    def snapshot(self) -> EpochTotals:
        loss_sum, correct = self.sums.tolist()
        return EpochTotals(loss_sum, correct, self.seen)


def reduce_totals(totals: EpochTotals, world: int, device) -> EpochTotals:
    """Every worker's epoch totals, summed (on every rank)."""
    t = torch.tensor([totals.loss_sum, totals.correct, float(totals.seen)], device=device,
                     dtype=torch.float64)
    loss_sum, correct, seen = all_reduce(t, world).tolist()
    return EpochTotals(loss_sum, correct, int(seen))


def features_input(features: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
    """Cached features are the model's input as they are (channels_last for conv maps)."""
    if channels_last and features.ndim == 4:
        return features.contiguous(memory_format=torch.channels_last)
    return features


def make_optimizer(model: nn.Module, optim, epochs: int, steps_per_epoch: int):
    """timm's optimizer factory (weight decay groups, layer decay) and its schedule.

    Args:
        optim: the config's `optim` section.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    extra = {"momentum": optim.momentum} if optim.name == "sgd" else {}
    optimizer = create_optimizer_v2(model, opt=optim.name, lr=optim.lr,
                                    weight_decay=optim.weight_decay,
                                    layer_decay=optim.layer_decay, **extra)
    if optim.schedule == "constant" and optim.warmup_epochs == 0:
        return optimizer, None
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine" if optim.schedule == "cosine" else "step",
        num_epochs=epochs, decay_epochs=10 ** 9, decay_rate=1.0,  # step = constant
        min_lr=optim.min_lr, warmup_lr=optim.lr * 0.01, warmup_epochs=optim.warmup_epochs,
        step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return optimizer, scheduler


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, num_classes: int, feed, amp, device,
             world: int = 1, keep: bool = False, tta: str = "none") -> Evaluation:
    """Loss, accuracy and AUC over every worker's part of a split, identical on all ranks.

    `model` must be the unwrapped model, so that no DDP collective runs per batch: workers
    may hold different numbers of rows. Labels and probabilities are gathered once at the
    end (AUC needs all of them). With `keep`, batches carry ids as a third item. With `tta`
    the probabilities (and the loss) are those averaged over the test-time views.
    """
    was_training = model.training
    model.eval()
    losses, labels_all, probs_all, images_kept, ids = [], [], [], [], []
    for images, labels, *batch_ids in batches:
        with amp:
            if tta == "none":
                logits = model(feed(images)).float()
                probs = logits.softmax(1)
                losses.append(F.cross_entropy(logits, labels, reduction="sum"))
            else:
                probs = tta_probabilities(model, feed(images), tta)
                losses.append(F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum"))
        labels_all.append(labels.cpu())
        probs_all.append(probs.cpu())
        if keep:
            ids.extend(batch_ids[0])
            if sum(len(i) for i in images_kept) < SAMPLE_IMAGES:
                images_kept.append(images[:SAMPLE_IMAGES].cpu())
    model.train(was_training)
    loss_sum = torch.stack(losses).sum() if losses else torch.zeros((), device=device)
    labels_np = torch.cat(labels_all).numpy() if labels_all else np.zeros(0, np.int64)
    probs_np = (torch.cat(probs_all).numpy() if probs_all
                else np.zeros((0, num_classes), np.float32))
    if world > 1:
        loss_sum = all_reduce(loss_sum.reshape(1), world)[0]
        gathered = [None] * world
        dist.all_gather_object(gathered, (labels_np, probs_np, ids))
        labels_np = np.concatenate([g[0] for g in gathered])
        probs_np = np.concatenate([g[1] for g in gathered])
        ids = [i for g in gathered for i in g[2]]
    out = Evaluation(loss=float(loss_sum) / max(len(labels_np), 1),
                     acc=metrics.accuracy(labels_np, probs_np),
                     auc=metrics.auc(labels_np, probs_np), rows=len(labels_np))
    if keep:
        preds = probs_np.argmax(1)
        out.confusion = metrics.confusion_matrix(labels_np, preds, num_classes)
        out.predictions = (ids, labels_np, probs_np)
        kept = torch.cat(images_kept).numpy()[:SAMPLE_IMAGES] if images_kept else None
        # Rank 0's own rows come first in the gathered arrays, so they line up with `kept`.
        if kept is not None:
            out.samples = (kept, labels_np[:len(kept)], preds[:len(kept)])
    return out


def all_reduce(t: torch.Tensor, world: int, op: str = "sum") -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def gather(value, world: int) -> list:
    """Every rank's `value`, on every rank."""
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out
