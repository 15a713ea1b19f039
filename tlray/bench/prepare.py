"""`tlray benchmark prepare`: the in-process prepare against the Ray prepare of the same source.

The source is a folder of synthetic RGB PNGs (`tlray.bench.images`), made once in `--workdir`
and reused. Each side (`tlray prepare --engine local|ray`, a command of its own, start-up
included; the Ray side joins the benchmark's cluster) prepares a small subset of it and then
the whole folder, into fresh destinations, with the same options, and the sides take turns
(`repeats` times; the fastest run of each counts, as a busy machine only slows runs down):
the whole folder gives the headline images/s and the
ratio; the two sizes together give each side's fixed start-up cost and its rate once running,
hence the number of images from which the Ray side finishes first. That crossover is what
`tlray.data.prepare.RAY_FROM_IMAGES` is set from (with a cluster that has to be started, the
case of `tlray prepare` on a laptop; a driver already on a cluster crosses earlier). Peak RSS
is that of the driver and of any one Ray process writing shards.

A cluster the benchmark starts itself gets the machine's CPUs, and its workers run at this
process's priority (see `tlray.bench.measure.start_ray`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tlray.bench.images import png_folder, subset
from tlray.bench.measure import SideBySide, best, start_ray, timed

TASK_TITLES = ("write_shard", "read_headers")


def prepare_benchmark(*, images: int = 20_000, side: int = 96, spread: int = 16,
                      image_size: int = 64, small: int = 2_000,
                      engines: tuple[str, ...] = ("local", "ray"), repeats: int = 3,
                      workdir: str | None = None) -> SideBySide:
    """Times `tlray prepare` of one synthetic folder on each engine (see the module docstring).

    Args:
        images: PNGs in the folder; side, spread: their size in pixels (side +- spread).
        image_size: what prepare resizes them to.
        small: the subset each side also prepares, first, for its start-up cost (0: none).
        engines: "local", "ray" or both.
        repeats: runs of each side, taking turns; the fastest of each counts.
        workdir: where the folder is kept between runs (default: a temporary directory).
    """
    import ray

    root = Path(workdir or tempfile.mkdtemp(prefix="tlray-bench-prepare-"))
    source = png_folder(root / f"cells-{images}-{side}", images, side=side, spread=spread)
    plan = [("", source, images)]
    if small:
        plan.insert(0, ("-small", subset(source, f"first{small}", small), small))
    ray_start_s = start_ray() if "ray" in engines else 0.0
    runs: dict = {}
    for _ in range(repeats):  # the sides take turns: a busy spell slows one run, not a side
        for suffix, folder, count in plan:
            for engine in engines:
                dest = root / f"out-{engine}{suffix}"
                shutil.rmtree(dest, ignore_errors=True)
                runs[engine + suffix] = best(runs.get(engine + suffix), timed(
                    ["prepare", str(folder), str(dest), "--image-size", str(image_size),
                     "--engine", engine], count, TASK_TITLES if engine == "ray" else ()))
                shutil.rmtree(dest, ignore_errors=True)
    cpus = ray.cluster_resources().get("CPU", 0.0) if "ray" in engines else 0.0
    return SideBySide(f"tlray prepare of {images:,} RGB PNGs ({side} +- {spread} px, resized "
                      f"to {image_size})", cpus, ray_start_s, runs, ray_side="ray")
