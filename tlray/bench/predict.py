"""`tlray benchmark predict`: the local pyfunc loop against the Ray pipeline, same model, same
images.

The images are a folder of synthetic 28x28 grey PNGs (`tlray.bench.images`, made once in
`--workdir`), scored as `tlray predict` scores an unlabelled dump: each file's bytes handed to
the model's pyfunc, which decodes, resizes and normalises them. The model is a
`tf_efficientnet_lite0` at 32 px with random weights (scoring costs the same as with trained
ones), logged once as tlray logs models, in a store of the benchmark's own; `--model` scores
with another one instead. Sides: `tlray predict --engine local`, then `--engine ray` with 2 and
with 1 replica(s) of one CPU each, every side a command of its own (start-up included) writing
the same CSV, the Ray sides joining the benchmark's cluster; the sides take turns (`repeats`
times; the fastest run of each counts, as a busy machine only slows runs down). Each side
also scores a
small subset first, which gives its fixed start-up cost (for Ray: starting the replicas and
loading the model in each), hence the number of images from which the Ray pipeline finishes
first: what `tlray.serve.predict.RAY_FROM_IMAGES` is set from. Peak RSS is that of the driver
and of any one replica.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tlray.bench.images import png_folder, subset
from tlray.bench.measure import SideBySide, best, start_ray, timed

REPLICA_TITLES = ("MapBatches(Replica)",)
SIDES = (("local", None), ("ray-2", 2), ("ray-1", 1))


def benchmark_model(store: Path) -> str:
    """A tf_efficientnet_lite0 for 28x28 grey digits at 32 px, logged (once) in `store`."""
    import numpy as np

    from tlray.model.build import build_model
    from tlray.serve.log_model import log_model
    from tlray.track import runs as tracking

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    logged = store / "model_uri.txt"
    if logged.is_file():
        return logged.read_text().strip()
    network, info = build_model("tf_efficientnet_lite0", 10, in_chans=1, weights="none")
    examples = np.zeros((2, 28, 28, 1), np.uint8)
    with tracking.start_run("benchmark-predict"):
        uri = log_model(network, examples, [str(k) for k in range(10)],
                        {"mean": info.data_config["mean"], "std": info.data_config["std"],
                         "size": [32, 32], "channels": 1}, name="bench-lite0").model_uri
    logged.write_text(uri)
    return uri


def predict_benchmark(*, images: int = 20_000, small: int = 1_000, model: str | None = None,
                      batch_size: int = 256, repeats: int = 2,
                      workdir: str | None = None) -> SideBySide:
    """Times `tlray predict` of one folder of PNGs on each side (see the module docstring)."""
    import ray

    root = Path(workdir or tempfile.mkdtemp(prefix="tlray-bench-predict-"))
    folder = png_folder(root / f"digits-{images}", images, side=28, mode="L", classes=10)
    small_folder = subset(folder, f"first{small}", small) if small else None
    if model is None:
        (root / "store").mkdir(exist_ok=True)
        model = benchmark_model(root / "store")
    ray_start_s = start_ray()
    runs: dict = {}
    plan = [("", folder, images)]
    if small_folder is not None:
        plan.insert(0, ("-small", small_folder, small))
    for _ in range(repeats):  # the sides take turns: a busy spell slows one run, not a side
        for suffix, source, count in plan:
            for name, replicas in SIDES:
                if suffix and name == "ray-1":
                    continue
                engine = ["--engine", "local"] if replicas is None else \
                    ["--engine", "ray", "--replicas", str(replicas)]
                runs[name + suffix] = best(runs.get(name + suffix), timed(
                    ["predict", model, str(source), "--out", str(root / f"{name}.csv"),
                     "--batch-size", str(batch_size), *engine], count,
                    REPLICA_TITLES if replicas else ()))
    return SideBySide(f"tlray predict of {images:,} 28x28 grey PNGs with {model}",
                      ray.cluster_resources().get("CPU", 0.0), ray_start_s, runs,
                      ray_side="ray-2")
