"""End to end on a real two-node Ray cluster, through `ray job submit`, on loopback only.

A Ray head plus a second raylet (two nodes; token authentication on, with a token made for
this test: ~/.ray/auth_token is neither read nor written), a real `mlflow server` (SQLite
store, artifacts uploaded through the server), and `jobs/tune_mnist.py --smoke` submitted as
a job with the checkout as its working dir. The MLflow server is killed after the first
trial's first epoch and started again on the same port and store while training goes on.
Then, through the server only: every trial has a run and none is left RUNNING, every
finished trial has every epoch's metrics, `@champion` loads and predicts, and the Train
workers of the trials ran on both nodes.

One sweep serves every check (a second would cost minutes on 2 cores). Everything started
here is stopped by the fixtures' finalizers, also when a test fails.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from cluster_helpers import VENV_BIN, MlflowServer, RayCluster, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
SWEEP = EXPERIMENT = REGISTERED = "tlray-e2e"
EPOCHS = 2  # the outage starts after epoch 1, so epoch 2's metrics are written into it
TRIALS = 2  # --smoke


def _say(msg: str) -> None:
    print(f"[cluster-e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(Ray cluster, MLflow server), started side by side and stopped whatever happens."""
    t0 = time.monotonic()
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    cluster = RayCluster(num_cpus_per_node=2, object_store_mb=300)
    try:
        server.launch()
        cluster.start_head()
        cluster.add_node()
        server.wait_ready()
        _say(f"2-node Ray cluster (dashboard {cluster.dashboard_url}) and MLflow server "
             f"({server.url}) up in {time.monotonic() - t0:.1f} s")
        yield cluster, server
    finally:
        t1 = time.monotonic()
        server.stop()
        cluster.stop()
        _say(f"Ray cluster and MLflow server stopped in {time.monotonic() - t1:.1f} s")


def _reports(home: Path) -> int:
    """Results Tune has recorded for the sweep's trials so far (one line per report)."""
    return sum(len(f.read_text().splitlines())
               for f in (home / "ray_results" / SWEEP).glob("*/result.json"))


@pytest.fixture(scope="module")
def sweep(stack, tmp_path_factory):
    """Submits the sweep, restarts the MLflow server mid-training, waits for the job."""
    from mlflow import MlflowClient

    cluster, server = stack
    home = tmp_path_factory.mktemp("tlray-home")
    job = f"tlray-e2e-{uuid.uuid4().hex[:8]}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": server.url, "TLRAY_HOME": str(home),
                                "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}}
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url,
           "--no-wait", "--submission-id", job, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "jobs/tune_mnist.py", "--smoke", f"--train.epochs={EPOCHS}",
           "--scaling.num_workers=2", "--scaling.placement_strategy=STRICT_SPREAD",
           # One trial at a time: a trial is ~8 processes of ~0.7 GB (driver, Train
           # controller, 2 workers, Ray Data coordinators); two at once beside other tests
           # got workers OOM-killed by Ray's memory monitor on a 24 GB machine.
           "--tune.max_concurrent=1", f"--tune.name={SWEEP}",
           f"--tracking.experiment={EXPERIMENT}", f"--tune.registered_name={REGISTERED}"]
    t0 = time.monotonic()
    # The client sends the cluster's token: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in env.
    out = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"ray job submit failed:\n{out.stdout}\n{out.stderr}"
    _say(f"submitted {job} (working dir {ROOT}) in {time.monotonic() - t0:.1f} s")

    client = MlflowClient(tracking_uri=server.url)
    outage: dict = {}

    def restart_server_after_first_epoch() -> None:
        """Kills the server once a trial has logged epoch 1; it stays down until Tune has
        recorded a newer report (rank 0 logs an epoch right after reporting it, so a write
        is known to hit the dead server), then comes back on the same port and store."""
        exp = client.get_experiment_by_name(EXPERIMENT)
        logged = exp and client.search_runs([exp.experiment_id], "metrics.val_loss > -1")
        if not logged:
            return
        reports, down = _reports(home), time.time()
        server.stop(grace_s=0)  # SIGKILL: a crash, not a clean shutdown
        try:
            wait_for(lambda: _reports(home) > reports
                     or cluster.job_status(job)["status"] in TERMINAL, 600,
                     "a trial's report after the MLflow server went down", 1.0)
            time.sleep(3)  # rank 0 is now retrying that epoch's write
        finally:
            restart_s = server.start()
            outage.update(down=down, up=time.time())
        _say(f"MLflow server down for {outage['up'] - down:.1f} s (restart {restart_s:.1f} s) "
             f"after {logged[0].info.run_name} logged epoch 1")

    try:
        while (status := cluster.job_status(job)["status"]) not in TERMINAL:
            assert time.monotonic() - t0 < 900, f"job {job} still {status} after 900 s"
            if not outage:
                restart_server_after_first_epoch()
            time.sleep(2)
    except BaseException:
        print(cluster.job_logs(job))
        cluster.stop_job(job)
        raise
    logs = cluster.job_logs(job)
    _say(f"job {job} {status} after {time.monotonic() - t0:.1f} s")
    assert status == "SUCCEEDED", f"{cluster.job_status(job).get('message')}\n{logs}"
    print(logs[-2500:])
    return {"client": client, "outage": outage, "logs": logs, "cluster": cluster,
            "server": server}


def _runs(client):
    """(parent run, child runs) of the sweep, read through the tracking server."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs([exp.experiment_id], f"tags.sweep = '{SWEEP}'")
    assert len(parents) == 1, [p.info.run_name for p in parents]
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    return parents[0], children


def test_every_trial_tracked_and_none_left_running(sweep):
    client = sweep["client"]
    parent, children = _runs(client)
    assert len(children) == TRIALS, [c.info.run_name for c in children]
    assert parent.info.status == "FINISHED"
    running = client.search_runs([parent.info.experiment_id], "attributes.status = 'RUNNING'")
    assert not running, [r.info.run_name for r in running]
    _say(f"trial runs: {[(c.info.run_name, c.info.status) for c in children]}")


def test_train_workers_ran_on_both_nodes(sweep):
    nodes = set(sweep["cluster"].alive_node_ids())
    assert len(nodes) == 2
    _, children = _runs(sweep["client"])
    seen = {}
    for run in children:  # rank 0 tags its run with the nodes of all its workers
        tag = run.data.tags.get("train_node_ids")
        assert tag, f"trial run {run.info.run_name} has no train_node_ids tag"
        seen[run.info.run_name] = set(tag.split(","))
        assert seen[run.info.run_name] <= nodes, (seen, nodes)
    assert any(ids == nodes for ids in seen.values()), (seen, nodes)
    _say(f"cluster nodes {sorted(nodes)}; per trial: {seen}")


def test_champion_loads_through_the_server_and_predicts(sweep):
    import mlflow
    import numpy as np
    import torch
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    uri = f"models:/{REGISTERED}@champion"
    with _use_tracking_uri(sweep["server"].url):  # restores the process's URI afterwards
        meta = mlflow.models.get_model_info(uri).metadata
        model = mlflow.pytorch.load_model(uri, device="cpu")
    pre = meta["preprocess"]
    batch = np.random.default_rng(0).standard_normal((3, pre["channels"], *pre["size"]))
    with torch.no_grad():
        logits = model(torch.from_numpy(batch.astype(np.float32)))
    assert tuple(logits.shape) == (3, len(meta["class_names"])) == (3, 10)
    assert torch.isfinite(logits).all()


def test_epoch_metrics_complete_across_mlflow_restart(sweep):
    client, outage = sweep["client"], sweep["outage"]
    assert outage, "the sweep ended before any trial logged an epoch: no outage was tested"
    _, children = _runs(client)
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert finished, [(r.info.run_name, r.info.status) for r in children]
    during = []
    for run in children:
        for key in ("val_loss", "val_acc"):
            history = client.get_metric_history(run.info.run_id, key)
            steps = sorted(m.step for m in history)
            if run.info.status == "FINISHED":  # every epoch, exactly once
                assert steps == list(range(1, EPOCHS + 1)), (run.info.run_name, key, steps)
            else:  # stopped early by ASHA: the epochs it ran, without gaps
                assert steps == list(range(1, len(steps) + 1)), (run.info.run_name, key, steps)
            during += [(run.info.run_name, key, m.step) for m in history
                       if outage["down"] * 1000 <= m.timestamp <= outage["up"] * 1000]
    # A metric's timestamp is when rank 0 logged it: these were logged into the outage.
    assert during, "no metric was logged while the server was down: the outage missed"
    _say(f"logged while the server was down, stored after it came back: {during}; "
         f"EpochLogger buffered {sweep['logs'].count('MLflow unavailable')} failed write(s) "
         f"(MLflow's client retries for ~4 min before an error reaches it)")
