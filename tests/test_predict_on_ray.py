"""`tlray predict` as a Ray Data pipeline: on a real two-raylet cluster (one model replica per
raylet) it answers every image exactly once, in the source's order, as the local loop does; a
prediction killed half-way leaves no output; `--gpu` puts the replicas' network on a GPU.

The model is a tiny real logged tlray model whose right answer is known for every generated
image (`brightness_models`)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from brightness_models import bright_images, log_champion, png
from cluster_helpers import RayCluster, wait_for
from stuck_files import release_readers, stuck_file

from tlray.serve.predict import predict
from tlray.track import runs as tracking

pytestmark = pytest.mark.ray

LEVELS = [0, 100, 200]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A store whose `bright@champion` takes grey images; its environment for drivers."""
    tmp = tmp_path_factory.mktemp("predict-on-ray-store")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "TLRAY_HOME": str(tmp)}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        with tracking.start_run("predict-on-ray-tests"):
            log_champion("bright", 1)
        yield env


@pytest.fixture(scope="module")
def two_raylets():
    """A Ray cluster of two raylets with one CPU each: two one-CPU replicas, one on each."""
    cluster = RayCluster(num_cpus_per_node=1, object_store_mb=150)
    try:
        cluster.start_head()
        cluster.add_node()
        yield cluster
    finally:
        cluster.stop()


def image_dump(folder: Path, count: int) -> list[str]:
    """`count` grey PNGs of known brightness, flat in `folder`; their right classes."""
    levels = [LEVELS[i % 3] for i in range(count)]
    for i, image in enumerate(bright_images(levels, (9, 9, 1), seed=4)):
        png(folder / f"img{i:03d}.png", image)
    return [str(level // 100) for level in levels]


def tlray_predict(cluster: RayCluster, store: dict, *args: str, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "tlray.cli", "predict", "bright", *args],
                            env={**cluster.env, **store}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **kwargs)


def test_two_raylets_answer_every_image_once_as_the_local_loop_does(store, two_raylets,
                                                                    tmp_path):
    expected = image_dump(tmp_path / "dump", 45)
    local = predict("bright", tmp_path / "dump", out=tmp_path / "local.csv", engine="local",
                    verbose=False)
    driver = tlray_predict(two_raylets, store, str(tmp_path / "dump"), "--engine", "ray",
                           "--replicas", "2", "--batch-size", "4",
                           "--out", str(tmp_path / "ray.csv"))
    output = driver.communicate(timeout=300)[0].decode()
    assert driver.returncode == 0, output[-3000:]

    on_ray = pd.read_csv(tmp_path / "ray.csv", dtype={"class": str})
    assert on_ray["id"].tolist() == [f"img{i:03d}.png" for i in range(45)]  # each once, in order
    assert on_ray["class"].tolist() == local["class"].tolist() == expected
    np.testing.assert_allclose(on_ray.filter(like="prob_").to_numpy(),
                               local.filter(like="prob_").to_numpy(), atol=1e-6)
    assert "predicted 45 rows" in output
    actors = two_raylets.api("/api/v0/actors?limit=1000&detail=true")["data"]["result"]["result"]
    replicas = [a for a in actors if "MapWorker" in a["class_name"]]
    assert {a["node_id"] for a in replicas} == set(two_raylets.node_ids)  # one on each raylet
    assert not any(a["death_cause"]["actor_died_error_context"]["never_started"]
                   for a in replicas)


def test_a_prediction_killed_half_way_leaves_no_output(store, two_raylets, tmp_path):
    image_dump(tmp_path / "dump", 24)
    # The last image never finishes reading (a hung network mount, say): every batch before
    # it is answered and written, the prediction can never complete.
    stuck = tmp_path / "dump" / "zzz.png"
    stuck_file(stuck)
    out = tmp_path / "answers.csv"
    driver = tlray_predict(two_raylets, store, str(tmp_path / "dump"), "--engine", "ray",
                           "--replicas", "1", "--batch-size", "4", "--out", str(out))
    try:
        wait_for(lambda: _rows_written(tmp_path) or driver.poll() is not None, 180,
                 "answers in the output's temporary sibling")
        assert driver.poll() is None, driver.communicate()[0].decode()[-3000:]
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.communicate(timeout=30)
        release_readers(stuck)  # its replica ends with the job, or with the cluster after this
    assert not out.exists()
    assert _rows_written(tmp_path) >= 4  # it was killed with answers written, half-way


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_replicas_answer_as_the_cpu_does(store, ray_cluster, tmp_path):
    expected = image_dump(tmp_path / "dump", 12)
    on_cpu = predict("bright", tmp_path / "dump", out=tmp_path / "cpu.csv", engine="local",
                     verbose=False)
    here = predict("bright", tmp_path / "dump", out=tmp_path / "gpu.csv", engine="local",
                   gpu=True, verbose=False)
    on_ray = predict("bright", tmp_path / "dump", out=tmp_path / "ray.csv", engine="ray",
                     gpu=True, replicas=1, verbose=False)
    for answers in (here, on_ray):
        assert answers["class"].tolist() == on_cpu["class"].tolist() == expected
        np.testing.assert_allclose(answers.filter(like="prob_").to_numpy(),
                                   on_cpu.filter(like="prob_").to_numpy(), atol=1e-4)


def _rows_written(folder: Path) -> int:
    """Answer rows in the temporary sibling of answers.csv, header left out."""
    found = list(folder.glob(".answers.csv.tmp-*"))
    return max(len(f.read_text().splitlines()) - 1 for f in found) if found else 0

