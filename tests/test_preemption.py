"""Spot nodes coming and going under an elastic run, on a real two-raylet Ray cluster (see
cluster_helpers).

One run, `scaling.num_workers=1-2`, one worker per node (STRICT_SPREAD). It starts on the head
alone with one worker. Once MLflow holds its epoch 1 (an observed event) a second node joins,
and the run grows to two workers (restarted from its latest checkpoint). Its one worker waits
after epoch 1 until then (a `hold` test fault, see tlray.train.faults): a node can take half a
minute to come up, and a run that did not wait would train on to its end meanwhile. Once
MLflow holds an epoch trained by both, the second node is drained as the autoscaler drains a
reclaimed spot instance: reason preemption, with a deadline. The test waits for the run's
record of the notice in MLflow (the just-in-time checkpoint is written with it), and at the
deadline kills the drained node. The run must resume from a checkpoint written after the
notice, not from the epoch's start, go on with one worker and finish, every epoch logged
once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cluster_helpers import RayCluster, wait_for

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 8  # the drain's notice: from the drain to the kill
# The drain comes after epoch 2, the first trained by two workers (4-8 s each at 32 px on 2
# cores): at most 2 more end within the deadline, so the run trains on with one worker after
# the kill.
EPOCHS = 6
ROWS = 4000  # the built-in digits' train split


@pytest.fixture
def cluster():
    # A worker takes 2 of a node's 3 CPUs: one worker per node, whatever the placement
    # strategy (Ray counts an elastic run's workers by free resources, not by strategy),
    # and a CPU for Ray Data beside it.
    c = RayCluster(num_cpus_per_node=3, object_store_mb=300)
    c.env["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"  # Ray's default is 5 s
    # A killed node is known dead after a second or two instead of 15 s. Ray Train decides
    # the new size at once, from resources that still count the dead node, and waits for a
    # placement group of the old size for RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by
    # default) before it goes on with fewer workers. That wait is for the placement group
    # alone (growing onto a node whose resources are there is not slowed by it): capped here.
    c.env.update(RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="3",
                 RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="5")
    try:
        c.start_head()
        yield c
    finally:
        c.stop()


def start_run(cluster: RayCluster, home: Path, tracking: str, *more: str) -> subprocess.Popen:
    # One worker waits after its epoch 1 (step 63 of 63, then the first of epoch 2) until the
    # test has seen two workers train.
    hold = f"hold:rank=0:step={-(-ROWS // 64) + 1}:until={home / 'grown'}"
    env = {**cluster.env, "TLRAY_HOME": str(home), "MLFLOW_TRACKING_URI": tracking,
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TLRAY_TEST_FAULT": hold,
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "tlray.cli", "train", "--data.dataset=builtin:mnist",
           "--model.backbone=test_efficientnet", "--model.weights=none",
           "--data.image_size=32", "--data.batch_size=64", f"--train.epochs={EPOCHS}",
           "--scaling.num_workers=1-2", "--scaling.placement_strategy=STRICT_SPREAD",
           "--scaling.cpus_per_worker=2", "--scaling.notice_check_every=2",
           "--scaling.grow_check_every=1",
           "--scaling.max_failures=0",  # so only the preemption budget can restart it
           "--tracking.log_model=false", "--tracking.experiment=preemption", *more]
    return subprocess.Popen(cmd, env=env, cwd=home, stdout=open(home / "run.log", "wb"),
                            stderr=subprocess.STDOUT)


def test_an_elastic_run_grows_onto_a_new_node_and_a_reclaimed_one_costs_only_its_last_steps(
        cluster, tlray_home):
    tracking = f"sqlite:///{tlray_home}/mlflow.db"
    run = start_run(cluster, tlray_home, tracking)
    client = MlflowClient(tracking)

    def running() -> None:
        assert run.poll() is None, (tlray_home / "run.log").read_text()[-3000:]

    def epoch_1_logged() -> str | None:
        running()
        exp = client.get_experiment_by_name("preemption")
        runs = exp and client.search_runs([exp.experiment_id])
        if runs and client.get_metric_history(runs[0].info.run_id, "val_loss"):
            return runs[0].info.run_id
        return None

    def trained_by_two() -> bool:
        running()
        return 2 in [m.value for m in client.get_metric_history(run_id, "workers")]

    try:
        run_id = wait_for(epoch_1_logged, 600, "epoch 1 in MLflow")
        doomed = cluster.add_node()
        cluster.recount_nodes_for_train()  # so that the run grows now, not at Ray's next tick
        wait_for(trained_by_two, 600, "an epoch trained by two workers")
        (tlray_home / "grown").touch()  # ends the hold of any one-worker group still in it
        cluster.drain(doomed, DEADLINE_S)
        drained, drained_at = time.monotonic(), time.time()
        notice = wait_for(lambda: client.get_run(run_id).data.tags.get("preemption_1"),
                          DEADLINE_S * 6, "the run to record the preemption notice")
        time.sleep(max(0.0, drained + DEADLINE_S - time.monotonic()))  # the deadline itself
        cluster.kill_node(doomed)
        wait_for(lambda: doomed not in cluster.alive_node_ids(), 120, "Ray to mark it dead")
        cluster.recount_nodes_for_train()  # it shrinks now, not after Ray's next tick
        assert run.wait(900) == 0, (tlray_home / "run.log").read_text()[-4000:]
    finally:
        if run.poll() is None:
            run.kill()
    log = (tlray_home / "run.log").read_text()
    record = json.loads(notice)
    noticed_at = datetime.strptime(record["noticed_at"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    assert noticed_at <= drained_at + DEADLINE_S  # the checkpoint came before the node went
    assert record["nodes"] == [doomed] and len(record["ranks"]) == 1

    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == \
        list(range(1, EPOCHS + 1))  # every epoch once, across both resizes
    workers = [int(m.value) for m in client.get_metric_history(run_id, "workers")]
    assert workers[0] == 1 and 2 in workers and workers[-1] == 1, workers  # grew, shrank
    assert [m.value for m in client.get_metric_history(run_id, "preemptions")] == [1]
    # It resumed from a checkpoint written after the notice (the last before Ray stopped
    # the workers: one shortly before the deadline, or an epoch's end after it): what ran
    # twice is the steps between it and the kill, a few, never the epoch.
    final = re.search(r"^checkpoint: (\S+)$", log, re.M)[1]
    state = json.loads((Path(final) / "state.json").read_text())
    assert len(state["resumed_at"]) == 2  # grown, then shrunk
    assert state["resumed_at"][-1] >= record["step"] and state["preemptions"] == 1
    steps_per_epoch = -(-ROWS // 2 // 64)
    (lost,) = client.get_metric_history(run_id, "preemption_steps_lost")
    assert 0 <= lost.value < steps_per_epoch
    assert finished.data.tags["train_node_ids"].split(",") == [cluster.node_ids[0]]
