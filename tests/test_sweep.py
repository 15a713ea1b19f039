"""The sweep on a real local Ray cluster and a real SQLite MLflow store."""

from __future__ import annotations

import glob
import json
import os

import mlflow
import pandas as pd
import pytest
import torch
from cluster_helpers import wait_for
from mlflow import MlflowClient

from tlray import config
from tlray.data.preprocess import to_model_input
from tlray.errors import TlrayError
from tlray.serve.predict import predict
from tlray.tune import sweep
from tlray.train.finish import model_example_images
from tlray.train.plan import check_model
from tlray.tune.space import freeze_choices, spread_trials

pytestmark = pytest.mark.ray

SMALL = ["--model.backbone=test_efficientnet", "--model.weights=none", "--data.image_size=32",
         "--scaling.num_workers=1", "--scaling.cpus_per_worker=0.5", "--train.epochs=2",
         "--train.monitor=val_acc", "--tune.freeze=0,2,all", "--tune.lr_min=1e-3",
         "--tune.lr_max=1e-2", "--tune.max_concurrent=2", "--tune.registered_name=digits",
         "--tracking.evaluate=never"]  # mlflow.models.evaluate: test_train and test_serving



def children(parent_run_id: str):
    client = MlflowClient()
    exp = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_run_id}'")


def data_stats_actor(ray):
    """Ray Data's one statistics actor: (id, state)."""
    from ray.data._internal.stats import STATS_ACTOR_NAME, STATS_ACTOR_NAMESPACE
    from ray.util.state import get_actor

    actor_id = ray.get_actor(STATS_ACTOR_NAME, namespace=STATS_ACTOR_NAMESPACE)._actor_id.hex()
    # This cluster's address: other Ray clusters may run on the machine.
    return actor_id, get_actor(actor_id, address=ray.get_runtime_context().gcs_address).state


def test_a_sweep_retries_a_dead_trial_and_registers_its_champion(ray_cluster, few_digits,
                                                                   tmp_path, monkeypatch):
    # Started by the driver when it connected, outside the trials' placement groups (and
    # maybe still starting, when this is the session's first test on its cluster).
    stats_actor = wait_for(lambda: (a := data_stats_actor(ray_cluster))[1] == "ALIVE" and a,
                           120, "Ray Data's statistics actor to start")
    # A one-worker trial trains in the Tune trial's own process (no Train controller or
    # workers), so a dead worker is a dead trial: the second trial's process dies in its
    # epoch 2, and Tune starts it again from its epoch 1 checkpoint, in a new process and a
    # new MLflow run.
    steps_per_epoch = -(-few_digits.splits["train"].rows // 64)
    monkeypatch.setenv("TLRAY_TEST_FAULT", f"kill:rank=0:step={steps_per_epoch + 3}:run=_00001")
    cfg = config.load(None, SMALL + [f"--data.dataset={few_digits.uri}",
                                     "--tune.num_samples=3", "--tune.max_failures=1"])
    first = sweep.sweep(cfg)
    # It outlived every trial (one that died with a trial took its datasets' stats along,
    # and Ray printed a KeyError traceback for each of them).
    assert data_stats_actor(ray_cluster) == stats_actor and stats_actor[1] == "ALIVE"

    by_trial = {}
    for r in sorted(children(first.parent_run_id), key=lambda r: r.info.start_time):
        by_trial.setdefault(r.data.tags["tune_trial_id"], []).append(r.info.status)
    assert len(by_trial) == 3
    (died,) = [t for t in by_trial if t.endswith("_00001")]
    assert by_trial.pop(died) == ["KILLED", "FINISHED"]
    assert all(statuses == ["FINISHED"] for statuses in by_trial.values())
    final = sorted(glob.glob(f"{first.path}/run_trial_*{died}*/checkpoint_*"))[-1]
    state = json.loads(open(f"{final}/state.json").read())
    assert state["resumed"] == 1  # died in epoch 2, came back from epoch 1's checkpoint
    assert [row["epoch"] for row in state["history"]] == [1, 2]
    assert not glob.glob(f"{os.path.dirname(first.path)}/trial-*")  # no Ray Train run dirs

    # The stratified search ran exactly the trials it spread over the space.
    planned = spread_trials(cfg, ["0", "2", "all"])
    assert sorted((t["model.freeze"], t["optim.lr"]) for t in first.trials) == sorted(
        (p["model.freeze"], p["optim.lr"]) for p in planned)
    assert MlflowClient().get_run(first.parent_run_id).info.status == "FINISHED"
    assert {t["status"] for t in first.trials} == {"COMPLETED"}
    artifacts = {a.path for a in MlflowClient().list_artifacts(first.parent_run_id)}
    assert {"sweep_results.csv", "search_space.json", "config.yaml", "plots"} <= artifacts
    plots = {a.path for a in MlflowClient().list_artifacts(first.parent_run_id, "plots")}
    assert "plots/samples.png" in plots  # one training image per class
    assert first.registered is not None and first.registered.moved
    champion = MlflowClient().get_model_version_by_alias("digits", "champion")
    assert int(champion.version) == first.registered.version
    assert MlflowClient().get_run(champion.run_id).info.status == "FINISHED"

    # Only the pick's model is logged (tune.log_models=pick), by the sweep, from its trial's
    # final checkpoint: the trials that lost exported nothing.
    picked = MlflowClient().get_run(champion.run_id)
    with_model = [r.data.tags["tune_trial_id"] for r in children(first.parent_run_id)
                  if "model_uri" in r.data.tags]
    assert with_model == [picked.data.tags["tune_trial_id"]]
    assert picked.data.tags["model_uri"] == first.model_uri == champion.source
    ckpt = sorted(glob.glob(f"{first.path}/run_trial_*{with_model[0]}*/checkpoint_*"))[-1]
    network, minfo = check_model(cfg, few_digits)
    network.load_state_dict(torch.load(f"{ckpt}/model.pt", weights_only=True))
    x = to_model_input(torch.from_numpy(model_example_images(few_digits)),
                       minfo.data_config["mean"], minfo.data_config["std"], (32, 32))
    with torch.no_grad():
        torch.testing.assert_close(mlflow.pytorch.load_model(first.model_uri, device="cpu")(x),
                                   network.eval()(x))

    # The champion predicts a Kaggle-style test.csv into a valid submission.
    digits = mnist_test_csv(tmp_path / "test.csv", few_digits)
    out = predict("models:/digits@champion", str(tmp_path / "test.csv"),
                  out=str(tmp_path / "submission.csv"), verbose=False)
    submission = pd.read_csv(tmp_path / "submission.csv")
    assert list(submission.columns) == ["ImageId", "Label"]
    assert submission["ImageId"].tolist() == list(range(1, len(digits) + 1))
    assert set(submission["Label"]) <= set(range(10)) and len(out) == len(digits)


def mnist_test_csv(path, info):
    """Unlabelled pixel rows from the dataset's test split, as Kaggle's test.csv."""
    from tlray.data.dataset import sample_per_class

    images, _ = sample_per_class(info, "test", per_class=3)
    pixels = images.reshape(len(images), -1)
    pd.DataFrame(pixels, columns=[f"pixel{i}" for i in range(pixels.shape[1])]).to_csv(
        path, index=False)
    return pixels


def test_bad_sweep_input_fails_before_any_trial(ray_cluster, few_digits):
    base = SMALL + [f"--data.dataset={few_digits.uri}"]
    with pytest.raises(TlrayError, match="tune.num_samples"):
        config.load(None, base + ["--tune.num_samples=0"])
    with pytest.raises(TlrayError, match="train.monitor"):
        config.load(None, base + ["--train.monitor=val_f1"])
    with pytest.raises(TlrayError, match="empty list of freeze depths"):
        sweep.sweep(config.load(None, base + ["--tune.freeze=,"]))
    with pytest.raises(TlrayError, match="not a freeze depth"):
        sweep.sweep(config.load(None, base + ["--tune.freeze=0,99"]))
    with pytest.raises(TlrayError, match="GPUs"):
        sweep.sweep(config.load(None, base + ["--scaling.use_gpu=true"]))
    with pytest.raises(TlrayError, match="nope"):
        sweep.sweep(config.load(None, base + ["--model.weights=models:/nope@champion"]))
    with pytest.raises(TlrayError, match="unknown setting"):
        sweep.sweep(config.load(None, base + ['--tune.space={"optim.nope": [1, 2]}']))
    assert not MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()])


def test_small_inputs_share_a_gpu_between_trials():
    from tlray import config as config_mod
    from tlray.tune.trial import share_gpus

    def share(*overrides):
        cfg = config_mod.load(None, ["--scaling.use_gpu=true", *overrides])
        return share_gpus(cfg).scaling.gpus_per_worker

    assert share("--data.image_size=48") == 0.25
    assert share("--data.image_size=128") == 0.5
    assert share("--data.image_size=224") == 1.0
    assert share("--data.image_size=48", "--tune.trials_per_gpu=3") == pytest.approx(1 / 3)
    assert share("--data.image_size=48", "--scaling.gpus_per_worker=0.5") == 0.5  # user's
    assert share("--data.image_size=48", "--scaling.gpus_per_worker=1") == 1.0  # a whole one
    assert share("--data.image_size=48", "--scaling.num_workers=2") == 1.0  # DDP: whole GPUs
    cpu = config_mod.load(None, ["--data.image_size=48"])
    assert share_gpus(cpu).scaling.gpus_per_worker is None  # no GPU: nothing to share


def test_stratified_trials_cover_learning_rate_and_freeze_depth():
    import math

    def trials(*overrides):
        cfg = config.load(None, ["--tune.lr_min=1e-4", "--tune.lr_max=1e-2", *overrides])
        return spread_trials(cfg, freeze_choices(cfg, tuple("abcdefgh")))

    four = trials("--tune.freeze=0,1,3", "--tune.num_samples=4")
    assert {t["model.freeze"] for t in four} == {"0", "1", "3"}  # every depth, one twice
    # One learning rate in each quarter of the log range.
    quarters = sorted(math.floor(math.log(t["optim.lr"] / 1e-4) / math.log(100) * 4)
                      for t in four)
    assert quarters == [0, 1, 2, 3]
    assert trials("--tune.freeze=0,1,3", "--tune.num_samples=4") == four  # seeded
    assert trials("--tune.freeze=0,1,3", "--tune.num_samples=4", "--tune.seed=7") != four
    # Fewer trials than depths: spread along the list, never two at one depth.
    order = [*"01234567", "all"]  # tune.freeze=auto over 8 groups
    depths = sorted(order.index(t["model.freeze"]) for t in trials("--tune.num_samples=4"))
    assert len(set(depths)) == 4 and depths[-1] - depths[0] >= 6
    # A fixed learning rate stays fixed.
    assert {t["optim.lr"] for t in trials("--tune.lr_min=1e-3", "--tune.lr_max=1e-3")} == {1e-3}
    # They start in rounds, in the order tune.freeze gives: every depth once, then again.
    assert [t["model.freeze"] for t in four][:3] == ["0", "1", "3"]
    six = trials("--tune.freeze=3,0,all", "--tune.num_samples=6")
    assert [t["model.freeze"] for t in six] == ["3", "0", "all"] * 2


def test_regret_trains_every_config_the_sweep_stopped_to_the_end(ray_cluster, few_digits,
                                                                   tmp_path):
    from tlray.bench import sweep as bench_sweep

    # One trial at a time: ASHA sees results in one order every time, so it stops the same
    # trials every time. Seed 4 plans freeze 0, then 2, then the head-only probe of a
    # randomly initialised backbone, which ASHA stops after its first epoch.
    result = bench_sweep.regret_benchmark(
        SMALL + [f"--data.dataset={few_digits.uri}", "--tune.num_samples=3", "--tune.seed=4",
                 "--tune.max_concurrent=1", "--tune.grace_period=1",
                 "--tracking.log_model=false"], workdir=str(tmp_path))
    m = result.monitor
    assert m == "val_acc" and len(result.trials) == 3
    stopped = [r for r in result.trials if "then trained to the end" in r["status"]]
    assert stopped  # ASHA stopped at least one (the probe of a random backbone, at least)
    for row in result.trials:  # every config has its full-budget numbers now
        assert row[m] is not None and row["test_acc"] is not None
    assert result.pick in result.trials and result.best in result.trials
    assert result.best[m] == max(r[m] for r in result.trials) >= result.pick[m]
    # A stopped trial's page says so (its run is the sweep's; the retrained one's is not).
    pages = [MlflowClient().get_run(r.info.run_id).data.tags.get("mlflow.note.content", "")
             for r in MlflowClient().search_runs(
                 [e.experiment_id for e in MlflowClient().search_experiments()])]
    assert sum("stopped by ASHA after epoch 1" in page for page in pages) == len(stopped)
    report = bench_sweep.format_regret(result)
    assert "<- pick" in report and "<- best fully trained" in report


def test_regret_is_what_the_pick_leaves_to_the_best_fully_trained_config():
    from tlray.bench.sweep import RegretResult, format_regret

    rows = [{"optim.lr": 0.1, "val_loss": 0.30, "test_acc": 0.90, "status": "COMPLETED"},
            {"optim.lr": 0.2, "val_loss": 0.20, "test_acc": 0.95,
             "status": "STOPPED, then trained to the end"}]
    result = RegretResult("val_loss", pick=rows[0], best=rows[1], trials=rows, sweep_s=10.0,
                          full_s=5.0)
    assert result.regret == pytest.approx(0.10) and result.test_regret == pytest.approx(0.05)
    lines = format_regret(result).splitlines()
    assert lines[1].endswith("COMPLETED <- pick")
    assert lines[2].endswith("then trained to the end <- best fully trained")
    assert lines[3].startswith("regret of the sweep's pick: val_loss 0.1000, test acc +0.0500")
