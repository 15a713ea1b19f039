"""What a training worker takes from Ray, as one object: the seam between the loop and Ray.

The per-worker loop (`tlray.train.loop`) never calls Ray itself; it calls a `WorkerSession`:

- `ray_session()`: Ray Train's worker APIs, or Ray Tune's in a Tune trial's own process;
- `LocalSession`: the same loop in this process, without Ray: one worker, its splits read
  from the dataset's Parquet shards, its reports and checkpoints kept in memory and on local
  disk. The tests drive the loop with it (resume, phase changes, early stopping, in seconds),
  and a person can step through a run with a debugger.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import torch
import torch.nn as nn


class WorkerSession(NamedTuple):
    """What the loop needs from Ray, wherever it runs."""

    rank: int
    world: int
    node_id: str
    device: torch.device
    report: Callable  # (metrics, checkpoint=...)
    get_checkpoint: Callable  # () -> the latest checkpoint reported (a restarted run's), or None
    prepare_model: Callable  # to the device, DDP-wrapped when world > 1
    checkpoint_class: type  # .from_directory(path)
    dataset_shard: Callable  # dataset name -> this worker's part of it (`.iter_batches`)
    preemption_notice: Callable  # () -> Ray Train's PreemptionInfo, or None (a barrier)


def ray_session(in_trial_process: bool, keeper=None) -> WorkerSession:
    """Ray Train's worker APIs, or Ray Tune's in a Tune trial's own process, or, in a
    one-worker run in the driver's own process, Ray Data's with tlray's `keeper`
    (`tlray.train.in_driver.CheckpointKeeper`) for checkpoints.

    In the last two (Train's local mode) the loop reports past Ray Train: local mode keeps
    reports to itself rather than passing them (and their checkpoints) on, and Ray refuses
    `ray.train.get_context` (which `prepare_model` calls) inside a Tune function. With one
    process there is nothing to wrap in DDP: preparing a model is moving it to the device.
    """
    import ray
    import ray.train
    import ray.train.torch

    from tlray.train.cluster import quiet_train_worker

    quiet_train_worker()
    # DDP's note that depthwise-conv gradients are laid out differently from its buckets is
    # about a copy, not about correctness; keep it out of the per-epoch output.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    node_id = ray.get_runtime_context().get_node_id()
    device = ray.train.torch.get_device()
    if keeper is not None:  # one node, the driver's: a drain notice could not spare it
        return WorkerSession(0, 1, node_id, device, keeper.report, keeper.latest,
                             lambda model: model.to(device), ray.train.Checkpoint,
                             ray.train.get_dataset_shard, lambda: None)
    if in_trial_process:
        from ray import tune

        # No notices there: a Tune trial that loses its node is retried by Tune from its
        # last checkpoint (`train.checkpoint_every` bounds what that costs).
        return WorkerSession(0, 1, node_id, device, tune.report, tune.get_checkpoint,
                             lambda model: model.to(device), tune.Checkpoint,
                             ray.train.get_dataset_shard, lambda: None)
    ctx = ray.train.get_context()
    return WorkerSession(ctx.get_world_rank(), ctx.get_world_size(), node_id, device,
                         ray.train.report, ray.train.get_checkpoint,
                         ray.train.torch.prepare_model, ray.train.Checkpoint,
                         ray.train.get_dataset_shard, ray.train.get_preemption_info)


class TableShard:
    """One worker's part of a split without Ray Data: its blocks (one per Parquet shard), in
    order, with `iter_batches` as a Ray `DataIterator` answers the loop."""

    def __init__(self, blocks: list[pa.Table]):
        self.blocks = blocks

    def iter_batches(self, *, batch_size=None, batch_format="pyarrow",
                     prefetch_batches: int = 0) -> Iterator[pa.Table]:
        if batch_size is not None or batch_format != "pyarrow":
            raise ValueError("a TableShard hands out whole pyarrow blocks only")
        return iter(self.blocks)


class LocalSession:
    """One worker in this process, without Ray; see the module docstring.

    Args:
        shards: dataset name ("train", "val", "test", "cache:train", ...) -> its blocks.
        storage: where reported checkpoints are kept (`checkpoint_000000`, ...).
        resume_from: the checkpoint a restarted run finds (`get_checkpoint`), e.g. the
            `latest` of a session whose run died.
        preemption_notice: what Ray Train would answer at each notice check (None: no notice).
    """

    def __init__(self, shards: dict[str, list[pa.Table]], storage: str | Path, *,
                 resume_from=None, preemption_notice: Callable[[], object] = lambda: None,
                 device: str = "cpu"):
        from ray.train import Checkpoint  # a plain directory handle: no cluster involved

        self._shards, self.storage = shards, Path(storage)
        self._checkpoint_class, self._resume_from = Checkpoint, resume_from
        self._notice, self._device = preemption_notice, torch.device(device)
        self.reports: list[tuple[dict, object | None]] = []  # (metrics, checkpoint), in order

    @classmethod
    def for_run(cls, args, storage: str | Path, **kwargs) -> LocalSession:
        """A session over the splits a run with `args` (`WorkerArgs`) reads: its dataset's
        Parquet shards, and its feature cache's (as `cache:<split>`) where it has one."""
        from tlray.config.schedule import parse as parse_schedule
        from tlray.data.dataset import load_info, read_shard
        from tlray.train.protocol import dataset_names

        phases = len(parse_schedule(args.config.model.freeze))
        cache = load_info(args.cache.uri) if args.cache is not None else None
        shards = {}
        for name in dataset_names(args.cache, phases):
            source, split = ((cache, name.removeprefix("cache:")) if name.startswith("cache:")
                             else (args.dataset, name))
            shards[name] = [read_shard(uri) for uri in source.shard_uris(split)]
        return cls(shards, storage, **kwargs)

    @property
    def latest(self):
        """The last checkpoint reported (what Ray would hand a restarted run)."""
        return next((c for _, c in reversed(self.reports) if c is not None), None)

    def session(self) -> WorkerSession:
        return WorkerSession(0, 1, "local", self._device, self._report, self._get_checkpoint,
                             self._prepare, self._checkpoint_class, self._shard, self._notice)

    def _report(self, metrics: dict, checkpoint=None) -> None:
        kept = None
        if checkpoint is not None:  # persisted, as Ray persists it before the loop deletes it
            target = self.storage / f"checkpoint_{len(self.reports):06d}"
            shutil.copytree(checkpoint.path, target)
            kept = self._checkpoint_class.from_directory(str(target))
        self.reports.append((dict(metrics), kept))

    def _get_checkpoint(self):
        return self.latest or self._resume_from

    def _prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self._device)

    def _shard(self, name: str) -> TableShard:
        return TableShard(self._shards[name])
