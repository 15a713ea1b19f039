"""What the dataset-scale benchmarks (`prepare`, `predict`) measure besides wall time: the
peak resident memory of the driver and of the Ray processes doing the work, and where a
fixed start-up cost makes the in-process path the faster one.

Each side runs as a tlray command in a process of its own, as a user runs it (its start-up and
imports included). Memory is sampled from /proc (Linux) every `interval_s`: that process (the
driver), and every process whose title (`ray::<task or actor>`, which Ray sets while a task
runs) contains one of the given names. Only a local cluster's processes are visible, which is
what a benchmark on one machine runs on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class PeakRss:
    """Peak RSS (MB) of the process `pid` and of the matching Ray workers while the block runs."""

    def __init__(self, pid: int, titles: tuple[str, ...], interval_s: float = 0.1):
        self.pid, self.titles, self.interval_s = pid, titles, interval_s
        self.driver_mb = self.workers_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            self.driver_mb = max(self.driver_mb, _rss_mb(self.pid))
            for pid in _matching(self.titles):
                self.workers_mb = max(self.workers_mb, _rss_mb(pid))
            if self._stop.wait(self.interval_s):
                return


def _rss_mb(pid: int) -> float:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * _PAGE / 2**20


def _matching(titles: tuple[str, ...]) -> list[int]:
    if not titles:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes()[:200].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and any(t in title for t in titles):
            found.append(int(entry))
    return found


@dataclass
class Timed:
    """One side of a benchmark on `images` images."""

    images: int
    seconds: float
    driver_mb: float
    workers_mb: float  # peak of any one worker process (0 in-process)

    @property
    def img_s(self) -> float:
        return self.images / self.seconds


def timed(command: list[str], images: int, titles: tuple[str, ...]) -> Timed:
    """Runs `command` (a tlray command line, in a process of its own, as a user runs it; Ray
    sides join this process's cluster) and measures it; its output is shown if it fails."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address} \
        if ray.is_initialized() else dict(os.environ)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tlray.cli", *command], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with PeakRss(proc.pid, titles) as rss:
        output = proc.communicate()[0]
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"`tlray {' '.join(command)}` failed:\n"
                           f"{output.decode(errors='replace')[-3000:]}")
    return Timed(images, seconds, rss.driver_mb, rss.workers_mb)


def best(earlier: Timed | None, run: Timed) -> Timed:
    """The faster of two runs of one side (a busy machine only ever slows a run down), with
    the higher memory peaks of the two."""
    if earlier is None:
        return run
    fast = run if run.seconds < earlier.seconds else earlier
    return Timed(fast.images, fast.seconds, max(run.driver_mb, earlier.driver_mb),
                 max(run.workers_mb, earlier.workers_mb))


def fixed_and_rate(small: Timed, large: Timed) -> tuple[float, float]:
    """(start-up seconds, images/s once running) of one side: the line through its small and
    its large run (each a command of its own, so both pay the same start-up)."""
    extra = large.seconds - small.seconds
    rate = (large.images - small.images) / extra if extra > 0 else float("inf")
    return max(0.0, small.seconds - small.images / rate), rate


def crossover(here: tuple[float, float], ray: tuple[float, float],
              ray_start_s: float = 0.0) -> float:
    """The number of images from which the Ray side finishes first (inf if never): where
    `fixed + n / rate` of both sides meet, the Ray side also paying `ray_start_s`."""
    (here_fixed, here_rate), (ray_fixed, ray_rate) = here, ray
    gain = 1 / here_rate - 1 / ray_rate
    if gain <= 0:
        return float("inf")
    return max(0.0, (ray_fixed + ray_start_s - here_fixed) / gain)


def start_ray(num_cpus: int | None = None) -> float:
    """Seconds to join or start Ray (0 when already connected). A cluster the benchmark starts
    itself runs its workers at this process's priority: Ray's default (niceness 15) would make
    the comparison with the in-process side one of priorities on a busy machine."""
    import ray

    from tlray.train.cluster import init_ray

    if ray.is_initialized():
        return 0.0
    os.environ.setdefault("RAY_worker_niceness", "0")
    start = time.perf_counter()
    init_ray(num_cpus=num_cpus)
    return time.perf_counter() - start


@dataclass
class SideBySide:
    """The in-process side ("local") against Ray sides, each run on a small input ("-small")
    and a large one, in one process on one machine."""

    what: str  # the headline: what was run on what
    cpus: float  # the Ray cluster's
    ray_start_s: float  # joining or starting Ray, which a command pays once
    runs: dict[str, Timed]  # "local", "ray..." and their "-small" runs
    ray_side: str  # the Ray side the crossover is computed for

    def ratio(self, side: str) -> float | None:
        """Images/s of `side` over the local side's on the same input."""
        base = self.runs.get("local-small" if side.endswith("-small") else "local")
        return self.runs[side].img_s / base.img_s if base else None

    def crossover(self, ray_start_s: float) -> float | None:
        """Images from which the Ray side finishes first, paying `ray_start_s` to connect."""
        fits = self.fits()
        if "local" not in fits or self.ray_side not in fits:
            return None
        return crossover(fits["local"], fits[self.ray_side], ray_start_s)

    def format(self, workers: str) -> str:
        lines = [f"{self.what}; Ray: {self.cpus:g} CPUs, joined or started in "
                 f"{self.ray_start_s:.1f} s",
                 f"{'side':<14}{'images':>9}{'seconds':>9}{'img/s':>9}{'ratio':>7}"
                 f"{'driver MB':>11}{workers + ' MB':>12}"]
        for name, run in self.runs.items():
            ratio = self.ratio(name)
            lines.append(f"{name:<14}{run.images:>9,}{run.seconds:>9.1f}{run.img_s:>9,.0f}"
                         f"{f'{ratio:.2f}' if ratio else '':>7}{run.driver_mb:>11,.0f}"
                         f"{run.workers_mb:>12,.0f}")
        fits = self.fits()
        if fits:
            lines.append("once running (from the small and the large runs): " + ", ".join(
                f"{side} {rate:,.0f} img/s after {fixed:.1f} s" for side, (fixed, rate)
                in fits.items()))
        for label, start in (("starting Ray", self.ray_start_s), ("Ray already running", 0.0)):
            n = self.crossover(start)
            if n is not None:
                lines.append(f"{self.ray_side} finishes first from ~{n:,.0f} images ({label})")
        return "\n".join(lines)

    def fits(self) -> dict[str, tuple[float, float]]:
        """(start-up seconds, images/s once running) of each side run at both sizes."""
        return {side: fixed_and_rate(self.runs[f"{side}-small"], self.runs[side])
                for side in self.runs if f"{side}-small" in self.runs}

    def json(self) -> str:
        return json.dumps({**asdict(self), "ratios": {k: self.ratio(k) for k in self.runs},
                           "once_running": self.fits(),
                           "crossover": self.crossover(self.ray_start_s),
                           "crossover_joined": self.crossover(0.0)}, indent=2)
