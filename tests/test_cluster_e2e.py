"""End to end on a real two-node Ray cluster, through `ray job submit`, on loopback only.

A Ray head plus a second raylet (two nodes; token authentication on, with a token made for
this test: ~/.ray/auth_token is neither read nor written), a real `mlflow server` (SQLite
store, artifacts uploaded through the server), and `jobs/tune_mnist.py --smoke` (one trial of
two workers, one per node) submitted as a job with the checkout as its working dir. The MLflow server is killed once the first
trial's first epoch is in the store, and stays down until a later epoch's metrics have been
sent to it and refused (seen on its port, see `cluster_helpers.Outage`); then it starts
again on the same port and store while training goes on.
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
from cluster_helpers import VENV_BIN, MlflowServer, Outage, RayCluster, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
SWEEP = EXPERIMENT = REGISTERED = "tlray-e2e"
EPOCHS = 2  # the outage starts after epoch 1 and lasts until a later epoch is written into it
TRIALS = 1
# ~85 s on an idle 2-core machine; MLflow's client may back off for up to 2 min on the outage.
JOB_LIMIT_S = 480


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
           "--tune.max_concurrent=1", f"--tune.num_samples={TRIALS}", f"--tune.name={SWEEP}",
           f"--tracking.experiment={EXPERIMENT}", f"--tune.registered_name={REGISTERED}"]
    t0 = time.monotonic()
    # The client sends the cluster's token: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in env.
    out = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"ray job submit failed:\n{out.stdout}\n{out.stderr}"
    _say(f"submitted {job} (working dir {ROOT}) in {time.monotonic() - t0:.1f} s")

    client = MlflowClient(tracking_uri=server.url)
    outage: dict = {}

    def restart_server_after_first_epoch() -> None:
        """Kills the server once a trial has logged epoch 1 and holds its port down until
        a later epoch's val_loss (stamped after the kill) has been sent there and refused;
        then starts it again on the same port and store. So a metric write is known to
        have hit the outage, however fast or slow the machine is."""
        exp = client.get_experiment_by_name(EXPERIMENT)
        logged = exp and client.search_runs([exp.experiment_id], "metrics.val_loss > -1")
        if not logged:
            return
        down = time.time()
        server.stop(grace_s=0)  # SIGKILL: a crash, not a clean shutdown
        refusing = Outage(server.port)
        try:
            wait_for(lambda: any(m["timestamp"] >= down * 1000
                                 for m in refusing.refused_metrics("val_loss"))
                     or cluster.job_status(job)["status"] in TERMINAL, 600,
                     "a later epoch's metrics to reach the dead MLflow server", 0.5)
        finally:
            refusing.end()
            restart_s = server.start()
            outage.update(down=down, up=time.time(),
                          refused=refusing.refused_metrics("val_loss"))
        _say(f"MLflow server down for {outage['up'] - down:.1f} s (restart {restart_s:.1f} s) "
             f"after {logged[0].info.run_name} logged epoch 1; refused "
             f"{len(refusing.requests)} request(s), among them val_loss of step(s) "
             f"{sorted({m['step'] for m in outage['refused']})}")

    try:
        while (status := cluster.job_status(job)["status"]) not in TERMINAL:
            if time.monotonic() - t0 > JOB_LIMIT_S:
                stuck = cluster.diagnose()  # before the job is stopped
                tail = "\n".join(cluster.job_logs(job).splitlines()[-40:])
                pytest.fail(f"job {job} still {status} after {JOB_LIMIT_S} s; where it "
                            f"is:\n{stuck}\n--- the job's last log lines:\n{tail}",
                            pytrace=False)
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
    # The deployable face of the same model: raw digits in, class names out.
    with _use_tracking_uri(sweep["server"].url):
        served = mlflow.pyfunc.load_model(uri)
    digits = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    assert set(served.predict(digits)["label"]) <= set(meta["class_names"])


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
    # And the very writes the dead server refused are in the store now, exactly once.
    assert outage["refused"], "the sweep ended before a later epoch reached the dead server"
    for m in {(m["run_id"], m["step"], m["timestamp"]): m for m in outage["refused"]}.values():
        history = client.get_metric_history(m["run_id"], "val_loss")
        stored = [(h.timestamp, h.value) for h in history if h.step == m["step"]]
        assert stored == [(m["timestamp"], pytest.approx(m["value"]))], m
    _say(f"logged while the server was down, stored after it came back: {during}; "
         f"EpochLogger buffered {sweep['logs'].count('MLflow unavailable')} failed write(s) "
         f"(MLflow's client retries for ~4 min before an error reaches it)")
