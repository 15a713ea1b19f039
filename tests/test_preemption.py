"""A spot node reclaimed mid-run, on a real two-raylet Ray cluster (see cluster_helpers).

Two Train workers, one per node (STRICT_SPREAD). Once MLflow holds epoch 1 (an observed
event), the second node is drained as the autoscaler drains a reclaimed spot instance:
reason preemption, with a deadline. With a fixed two workers a replacement node joins (what
the autoscaler starts); with `scaling.num_workers=1-2` none does, and the run must go on
with one worker. The test waits for the run's record of the notice in MLflow (the
just-in-time checkpoint is written with it), and at the deadline kills the drained node.
The run must resume from that checkpoint, not from the epoch's start, and finish.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cluster_helpers import RayCluster, wait_for

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 15  # the drain's notice: from the drain to the kill
EPOCHS = 10  # ~4 s each at 64 px on 2 cores: still training at the deadline


@pytest.fixture
def cluster():
    # A worker takes 2 of a node's 3 CPUs: one worker per node, whatever the placement
    # strategy (Ray counts an elastic run's workers by free resources, not by strategy),
    # and a CPU for Ray Data beside it.
    c = RayCluster(num_cpus_per_node=3, object_store_mb=300)
    c.env["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"  # Ray's default is 5 s
    try:
        c.start_head()
        yield c
    finally:
        c.stop()


def start_run(cluster: RayCluster, home: Path, tracking: str, workers: str,
              *more: str) -> subprocess.Popen:
    env = {**cluster.env, "TLRAY_HOME": str(home), "MLFLOW_TRACKING_URI": tracking,
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "tlray.cli", "train", "--data.dataset=builtin:mnist",
           "--model.backbone=test_efficientnet", "--model.weights=none",
           "--data.image_size=64", "--data.batch_size=64", f"--train.epochs={EPOCHS}",
           f"--scaling.num_workers={workers}", "--scaling.placement_strategy=STRICT_SPREAD",
           "--scaling.cpus_per_worker=2", "--scaling.notice_check_every=2",
           "--scaling.max_failures=0",  # so only the preemption budget can restart it
           "--tracking.log_model=false", "--tracking.experiment=preemption", *more]
    return subprocess.Popen(cmd, env=env, cwd=home, stdout=open(home / "run.log", "wb"),
                            stderr=subprocess.STDOUT)


def wait_for_epoch_1(client: MlflowClient, run: subprocess.Popen, home: Path) -> str:
    """The run's id, once MLflow holds its first epoch (the event the faults wait for)."""
    def epoch_1_logged():
        assert run.poll() is None, (home / "run.log").read_text()[-3000:]
        exp = client.get_experiment_by_name("preemption")
        runs = exp and client.search_runs([exp.experiment_id])
        if runs and client.get_metric_history(runs[0].info.run_id, "val_loss"):
            return runs[0].info.run_id
        return None
    return wait_for(epoch_1_logged, 600, "epoch 1 in MLflow")


@pytest.mark.parametrize("workers", ["2", "1-2"])
def test_a_reclaimed_spot_node_costs_the_steps_since_its_notice(cluster, tmp_path, workers):
    cluster.add_node()
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    run = start_run(cluster, tmp_path, tracking, workers)
    client = MlflowClient(tracking)
    try:
        run_id = wait_for_epoch_1(client, run, tmp_path)
        doomed = cluster.node_ids[1]
        cluster.drain(doomed, DEADLINE_S)
        drained, drained_at = time.monotonic(), time.time()
        if workers == "2":  # the replacement the autoscaler starts, while the run goes on
            replacement = threading.Thread(target=cluster.add_node)
            replacement.start()
        notice = wait_for(lambda: client.get_run(run_id).data.tags.get("preemption_1"),
                          DEADLINE_S * 4, "the run to record the preemption notice")
        time.sleep(max(0.0, drained + DEADLINE_S - time.monotonic()))  # the deadline itself
        cluster.kill_node(doomed)
        if workers == "2":
            replacement.join()
        assert run.wait(600) == 0, (tmp_path / "run.log").read_text()[-4000:]
    finally:
        if run.poll() is None:
            run.kill()
    log = (tmp_path / "run.log").read_text()
    record = json.loads(notice)
    noticed_at = datetime.strptime(record["noticed_at"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    assert noticed_at <= drained_at + DEADLINE_S  # the checkpoint came before the node went
    assert record["nodes"] == [doomed] and len(record["ranks"]) == 1

    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == \
        list(range(1, EPOCHS + 1))  # every epoch once, the interrupted one too
    assert [m.value for m in client.get_metric_history(run_id, "preemptions")] == [1]
    # It resumed from a checkpoint written after the notice (the last before Ray stopped
    # the workers: one shortly before the deadline, or an epoch's end after it): what ran
    # twice is the steps between it and the kill, a few, never the epoch.
    final = re.search(r"^checkpoint: (\S+)$", log, re.M)[1]
    state = json.loads((Path(final) / "state.json").read_text())
    assert len(state["resumed_at"]) == 1 and state["resumed_at"][0] >= record["step"]
    assert state["preemptions"] == 1
    steps_per_epoch = -(-4000 // 2 // 64)
    (lost,) = client.get_metric_history(run_id, "preemption_steps_lost")
    assert 0 <= lost.value < steps_per_epoch
    nodes = finished.data.tags["train_node_ids"].split(",")  # of the last start
    assert doomed not in nodes
    assert len(nodes) == (2 if workers == "2" else 1)  # elastic: went on with one worker


def test_an_elastic_run_grows_when_a_node_joins(cluster, tmp_path):
    # One node: room for one of the two workers, so the run starts with one. Once epoch 1
    # is in MLflow a second node joins; Ray looks for room every grow_check_every seconds
    # and restarts the workers, two now, from the latest checkpoint.
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    run = start_run(cluster, tmp_path, tracking, "1-2", "--scaling.grow_check_every=1",
                    "--train.checkpoint_every=8")
    client = MlflowClient(tracking)
    try:
        run_id = wait_for_epoch_1(client, run, tmp_path)
        cluster.add_node()
        assert run.wait(600) == 0, (tmp_path / "run.log").read_text()[-4000:]
    finally:
        if run.poll() is None:
            run.kill()
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == \
        list(range(1, EPOCHS + 1))  # every epoch once, across the resize
    workers = [m.value for m in client.get_metric_history(run_id, "workers")]
    assert workers[0] == 1 and workers[-1] == 2, workers
    assert len(finished.data.tags["train_node_ids"].split(",")) == 2
    assert "preemptions" not in finished.data.metrics  # growing is not a preemption
