"""One worker in the driver's own process: a one-worker CPU run on a one-machine cluster.

Ray Train runs every worker in an actor of its own, which a controller actor of its own
starts: for one worker on the machine the driver already runs on, that is two more
processes, each importing torch, timm and tlray again, ~10 s on 2 cores before the first
step, and ~1.4 GB. Here Ray Train's local mode (`num_workers=0`) runs the loop in this
process on the same Ray Datasets, and tlray does what Ray Train would do around it: it holds
the worker's resources (a placement group), persists every reported checkpoint under the
run's storage (the best `train.keep_checkpoints` by the monitor, and the latest), and
restarts a failed run from its latest checkpoint up to `scaling.max_failures` times. A
Tune trial's one worker trains in the trial's own process the same way
(`tune.in_trial_process`), reporting to Tune instead.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

from tlray.errors import TlrayError


def trains_in_driver(cfg) -> bool:
    """Whether a run's one worker trains in this process (`scaling.in_driver_process`): one
    worker, no GPU, checkpoints on a local disk, and a cluster of one node that this process
    is a driver on (not a Ray Client far from it), so that the worker would run on this
    machine anyway."""
    import ray
    from ray.util.client import ray as ray_client

    s = cfg.scaling
    if not s.in_driver_process or s.elastic or s.max_workers != 1 or s.use_gpu:
        return False
    if ray_client.is_connected():
        return False
    if "://" in str(cfg.storage_path) and not str(cfg.storage_path).startswith("file://"):
        return False
    try:
        return sum(1 for node in ray.nodes() if node.get("Alive")) == 1
    except Exception:  # noqa: BLE001 - no answer from Ray: Ray Train places the worker
        return False


class CheckpointKeeper:
    """Ray Train's checkpoint handling, for a run in this process: every reported checkpoint
    copied to `folder/checkpoint_NNNNNN`; the `keep` best by `monitor` and the latest kept,
    the rest deleted (reports without the monitor, e.g. mid-epoch ones, rank last)."""

    def __init__(self, folder: str | Path, keep: int | None, monitor: str, mode: str):
        self.folder, self.keep, self.monitor, self.mode = Path(folder), keep, monitor, mode
        self._kept: list[tuple[float, Path]] = []  # (score, directory), oldest first
        self._count = 0

    def report(self, metrics: dict, checkpoint=None) -> None:
        if checkpoint is None:
            return
        target = self.folder / f"checkpoint_{self._count:06d}"
        self._count += 1
        shutil.copytree(checkpoint.path, target)
        self._kept.append((self._score(metrics), target))
        self._prune()

    def latest(self):
        """The last checkpoint reported (what a restarted run resumes from), or None."""
        from ray.train import Checkpoint

        return Checkpoint.from_directory(str(self._kept[-1][1])) if self._kept else None

    def _score(self, metrics: dict) -> float:
        value = metrics.get(self.monitor)
        if not isinstance(value, (int, float)) or math.isnan(value):
            return -math.inf
        return value if self.mode == "max" else -value

    def _prune(self) -> None:
        if self.keep is None or self.keep < 1 or len(self._kept) <= self.keep:
            return
        latest = self._kept[-1]
        best = sorted(self._kept, key=lambda kept: kept[0], reverse=True)[:self.keep]
        for kept in [k for k in self._kept if k not in best and k is not latest]:
            shutil.rmtree(kept[1], ignore_errors=True)
            self._kept.remove(kept)


def fit_in_driver(fit_once: Callable[[], None], keeper: CheckpointKeeper, resources: dict,
                  max_failures: int = 0):
    """Runs `fit_once` (a local-mode Ray Train fit) here; returns its latest checkpoint.

    The worker's `resources` are held in a placement group meanwhile, as Ray Train would
    hold them, so that other runs on the cluster count them as taken. A failure (not a
    `TlrayError`: bad input fails the same way again) restarts the run from its latest
    checkpoint, up to `max_failures` times (-1: no limit; a run's `scaling.max_failures`).
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    import ray

    group = placement_group([resources])
    ray.get(group.ready())
    failures = 0
    try:
        while True:
            try:
                fit_once()
                break
            except TlrayError:
                raise
            except Exception as error:  # noqa: BLE001 - retried as Ray Train would, or raised
                if 0 <= max_failures <= failures:
                    raise
                failures += 1
                limit = "no limit" if max_failures < 0 else f"{max_failures}"
                print(f"training failed ({type(error).__name__}: {error}); resuming from the "
                      f"latest checkpoint (failure {failures}, scaling.max_failures {limit})",
                      flush=True)
    finally:
        remove_placement_group(group)
    return keeper.latest()
