"""The training benchmark's result, and how it is printed: a table row, the figures behind it,
and JSON."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class TrainBenchResult:
    """One side-by-side measurement; rates are train images/s (all workers together)."""

    device: str
    backbone: str
    weights: str
    image_size: int
    data_size: int
    batch_size: int
    workers: int
    threads: int  # torch intra-op threads: plain process = each Ray worker
    nice: int  # niceness of the Ray workers (Ray's RAY_worker_niceness)
    plain_nice: int  # niceness of the plain process (= nice unless it could not be raised)
    steps: int  # timed steps per pass (plain) and per epoch and worker (tlray)
    plain_img_s: float  # best timed pass (half of them before the tlray run, half after)
    tlray_img_s: float  # best epoch after the first
    plain_passes_img_s: list[float] = field(default_factory=list)
    tlray_epochs_img_s: list[float] = field(default_factory=list)  # epoch 1 included
    tlray_epoch_seconds: list[float] = field(default_factory=list)  # incl. val + checkpoint
    tlray_wall_s: float = 0.0  # the whole train() call: Ray start, workers, MLflow, test
    ingest_img_s: float = 0.0  # one worker's batches alone, on its device (best pass)
    ingest_passes_img_s: list[float] = field(default_factory=list)  # first pass included
    load_avg: list[float] = field(default_factory=list)  # 1-min load: at start, at end
    # With `notice_checks`: tlray again, asking for a preemption notice after every step
    # (the main tlray run then never asks); best epoch after the first.
    notice_img_s: float = 0.0

    @property
    def notice_ratio(self) -> float:
        """Train speed asking for a notice every step over never asking."""
        return self.notice_img_s / self.tlray_img_s

    @property
    def ms_per_notice_check(self) -> float:
        per_step = self.batch_size * self.workers
        return 1000 * (per_step / self.notice_img_s - per_step / self.tlray_img_s)

    @property
    def ratio(self) -> float:
        return self.tlray_img_s / self.plain_img_s

    @property
    def ingest_headroom(self) -> float:
        """What Ray Data delivers to one worker's device over what that worker trains on:
        at least ~1.2 means the training never waits for data."""
        return self.ingest_img_s / (self.tlray_img_s / self.workers)


def device_name(cuda: bool) -> str:
    if cuda:
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


def format_train(result: TrainBenchResult) -> str:
    r = result
    header = (f"{'device':<16}{'model':<24}{'size':>5}{'batch':>6}{'workers':>8}{'threads':>8}"
              f"{'nice':>5}{'plain img/s':>13}{'tlray img/s':>13}{'ratio':>7}")
    nice = f"{r.nice}" if r.nice == r.plain_nice else f"{r.plain_nice}/{r.nice}"
    row = (f"{r.device[:15]:<16}{r.backbone[:23]:<24}{r.image_size:>5}{r.batch_size:>6}"
           f"{r.workers:>8}{r.threads:>8}{nice:>5}{r.plain_img_s:>13,.0f}"
           f"{r.tlray_img_s:>13,.0f}{r.ratio:>7.2f}")
    note = (f"plain: best of {len(r.plain_passes_img_s)} passes of {r.steps} steps, before and "
            f"after tlray "
            f"({', '.join(f'{x:,.0f}' for x in r.plain_passes_img_s)}); tlray: best epoch "
            f"after the first ({', '.join(f'{x:,.0f}' for x in r.tlray_epochs_img_s)}), "
            f"{r.steps} steps per worker and epoch; data {r.data_size} px -> {r.image_size} px")
    ingest = (f"ingest: {r.ingest_img_s:,.0f} img/s reach one worker's {r.device.split()[0]} "
              f"with nothing else to do (best pass after the first; "
              f"{', '.join(f'{x:,.0f}' for x in r.ingest_passes_img_s)}), "
              f"{r.ingest_headroom:.1f}x what it trains on")
    lines = [header, row, note, ingest]
    if r.notice_img_s:
        lines.append(f"preemption notice checks: asking after every step trains at "
                     f"{r.notice_img_s:,.0f} img/s, {r.notice_ratio:.3f}x never asking "
                     f"({r.ms_per_notice_check:.2f} ms per ask; tlray asks every "
                     f"scaling.notice_check_every steps, default 10)")
    cores = os.cpu_count() or 1
    if r.device.startswith("cpu") and max(r.load_avg or [0]) > cores:
        lines.append(f"warning: the machine was busy (1-min load average "
                     f"{' -> '.join(f'{x:.1f}' for x in r.load_avg)} on {cores} cores): "
                     f"CPU timings are noisy, compare the per-pass figures")
    return "\n".join(lines)


def train_json(result: TrainBenchResult) -> str:
    extra = ({"notice_ratio": result.notice_ratio,
              "ms_per_notice_check": result.ms_per_notice_check}
             if result.notice_img_s else {})
    return json.dumps(dict(asdict(result), ratio=result.ratio,
                           ingest_headroom=result.ingest_headroom, **extra), indent=2)
