"""End to end on a real two-node Ray cluster, through `ray job submit`, on loopback only.

A Ray head and a second raylet (two nodes, token authentication on, with a token made for
this test: the user's ~/.ray/auth_token is never read or written), a real `mlflow server`
(SQLite store, artifacts uploaded through the server), and `jobs/tune_mnist.py` submitted
as a job with the checkout as its working dir. Then, through the MLflow server only: every
trial has a run, none is left RUNNING, `@champion` loads and predicts, and the Train workers
of a trial ran on both nodes. A second sweep survives a restart of the MLflow server in the
middle of training with every epoch's metrics intact.

Everything started here is stopped by the fixtures' finalizers, also when a test fails:
each process group is ours (`start_new_session=True`), and nothing is stopped by name.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from cluster_helpers import VENV_BIN, MlflowServer, RayCluster

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _say(msg: str) -> None:
    print(f"[cluster-e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@pytest.fixture(scope="module")
def cluster():
    t0 = time.monotonic()
    c = RayCluster(num_cpus_per_node=2, object_store_mb=300)
    try:
        c.start_head()
        c.add_node()
        _say(f"2-node Ray cluster up in {time.monotonic() - t0:.1f} s "
             f"(dashboard {c.dashboard_url}, nodes {c.alive_node_ids()})")
        yield c
    finally:
        t1 = time.monotonic()
        c.stop()
        _say(f"Ray cluster stopped in {time.monotonic() - t1:.1f} s")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        _say(f"MLflow server up in {server.start():.1f} s at {server.url}")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def job_home(tmp_path_factory):
    """TLRAY_HOME of the submitted jobs: shared, so the second reuses the prepared data."""
    return tmp_path_factory.mktemp("tlray-home")


def submit(cluster: RayCluster, server: MlflowServer, home: Path, args: list[str]) -> str:
    """`ray job submit --no-wait` of jobs/tune_mnist.py; returns the submission id."""
    submission_id = f"tlray-e2e-{uuid.uuid4().hex[:8]}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": server.url, "TLRAY_HOME": str(home),
                                "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                                "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}}  # TEMP workaround
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url, "--no-wait",
           "--submission-id", submission_id, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "jobs/tune_mnist.py", "--smoke", "--scaling.num_workers=2",
           "--scaling.placement_strategy=STRICT_SPREAD",
           # One trial at a time: a trial is ~8 processes of ~0.7 GB (driver, Train
           # controller, 2 workers, Ray Data coordinators); two at once beside another test
           # run got workers OOM-killed by Ray's memory monitor on a 24 GB machine.
           "--tune.max_concurrent=1", *args]
    t0 = time.monotonic()
    # The client authenticates with the cluster's token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN).
    out = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"ray job submit failed:\n{out.stdout}\n{out.stderr}"
    uploads = [line for line in (out.stdout + out.stderr).splitlines() if "package" in line]
    _say(f"submitted {submission_id} in {time.monotonic() - t0:.1f} s; {uploads}")
    return submission_id


def wait_job(cluster: RayCluster, submission_id: str, timeout_s: float, on_poll=None) -> str:
    """Polls the job until it ends; on failure the job's logs are in the assertion message."""
    t0 = time.monotonic()
    try:
        while True:
            status = cluster.job(submission_id)["status"]
            if status in TERMINAL:
                break
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"job {submission_id} still {status} after {timeout_s:g} s")
            if on_poll is not None:
                on_poll()
            time.sleep(2)
    except BaseException:
        print(cluster.job_logs(submission_id))
        cluster.stop_job(submission_id)
        raise
    logs = cluster.job_logs(submission_id)
    _say(f"job {submission_id} {status} after {time.monotonic() - t0:.1f} s")
    assert status == "SUCCEEDED", (f"job {submission_id} {status}: "
                                   f"{cluster.job(submission_id).get('message')}\n{logs}")
    return logs


def sweep_runs(client, experiment: str, sweep: str):
    """(parent run, child runs) of one sweep, read through the tracking server."""
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    parents = client.search_runs([exp.experiment_id], f"tags.sweep = '{sweep}'")
    assert len(parents) == 1, f"expected one parent run of sweep {sweep}, got {len(parents)}"
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    return parents[0], children


def test_sweep_job_on_two_nodes(cluster, mlflow_server, job_home):
    import mlflow
    import numpy as np
    import torch
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    sweep, experiment, registered = "e2e-smoke", "tlray-e2e-smoke", "tlray-e2e-smoke"
    job = submit(cluster, mlflow_server, job_home,
                 [f"--tune.name={sweep}", f"--tracking.experiment={experiment}",
                  f"--tune.registered_name={registered}"])
    logs = wait_job(cluster, job, timeout_s=600)
    print(logs[-3000:])

    client = MlflowClient(tracking_uri=mlflow_server.url)
    parent, children = sweep_runs(client, experiment, sweep)
    assert len(children) == 2, [c.info.run_name for c in children]  # --smoke: 2 trials
    exp_id = parent.info.experiment_id
    running = client.search_runs([exp_id], "attributes.status = 'RUNNING'")
    assert not running, f"runs left RUNNING: {[r.info.run_name for r in running]}"
    assert parent.info.status == "FINISHED"

    # Train workers ran on both nodes: rank 0 tags every trial's run with the nodes it saw.
    nodes = set(cluster.alive_node_ids())
    assert len(nodes) == 2
    seen = {}
    for run in children:
        tag = run.data.tags.get("train_node_ids")
        assert tag, f"trial run {run.info.run_name} has no train_node_ids tag"
        seen[run.info.run_name] = set(tag.split(","))
        assert seen[run.info.run_name] <= nodes, (seen, nodes)
    assert any(ids == nodes for ids in seen.values()), (seen, nodes)
    _say(f"trial node ids: {seen}")

    # The champion loads from the registry, through the server, and predicts.
    with _use_tracking_uri(mlflow_server.url):
        uri = f"models:/{registered}@champion"
        meta = mlflow.models.get_model_info(uri).metadata
        pre = meta["preprocess"]
        model = mlflow.pytorch.load_model(uri, device="cpu")
    batch = torch.from_numpy(np.random.default_rng(0).standard_normal(
        (3, pre["channels"], *pre["size"])).astype(np.float32))
    with torch.no_grad():
        logits = model(batch)
    assert tuple(logits.shape) == (3, len(meta["class_names"])) == (3, 10)
    assert torch.isfinite(logits).all()


def test_sweep_survives_mlflow_restart(cluster, mlflow_server, job_home):
    from mlflow import MlflowClient

    sweep, experiment, epochs = "e2e-outage", "tlray-e2e-outage", 3
    job = submit(cluster, mlflow_server, job_home,
                 [f"--tune.name={sweep}", f"--tracking.experiment={experiment}",
                  f"--tune.registered_name={experiment}", f"--train.epochs={epochs}"])
    client = MlflowClient(tracking_uri=mlflow_server.url)
    outage = {}

    def restart_after_first_metric() -> None:
        """Once a trial has logged an epoch, kill the server, wait, start it again."""
        if outage:
            return
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return
        logged = client.search_runs([exp.experiment_id], "metrics.val_loss > -1")
        if not logged:
            return
        t0 = time.monotonic()
        mlflow_server.stop(grace_s=0)  # a crash, not a clean shutdown
        time.sleep(5)
        restart_s = mlflow_server.start()
        outage.update(seconds=time.monotonic() - t0, restart_s=restart_s,
                      after_epoch_of=logged[0].info.run_name)
        _say(f"MLflow server down for {outage['seconds']:.1f} s "
             f"(restart {restart_s:.1f} s), after {outage['after_epoch_of']} logged epoch 1")

    logs = wait_job(cluster, job, timeout_s=900, on_poll=restart_after_first_metric)
    print(logs[-3000:])
    assert outage, "the sweep ended before any trial logged a metric: no outage was tested"
    buffered = logs.count("MLflow unavailable")
    _say(f"EpochLogger reported {buffered} failed write(s) it kept for retry")

    parent, children = sweep_runs(client, experiment, sweep)
    assert len(children) == 2
    assert not client.search_runs([parent.info.experiment_id], "attributes.status = 'RUNNING'")
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert finished, [(r.info.run_name, r.info.status) for r in children]
    for run in finished:
        for key in ("val_loss", "val_acc"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, epochs + 1)), (run.info.run_name, key, steps)
    for run in children:
        if run.info.status != "FINISHED":  # stopped by ASHA: its epochs so far, no gaps
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))
            assert steps == list(range(1, len(steps) + 1)), (run.info.run_name, steps)
