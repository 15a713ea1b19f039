"""One training run on a real local Ray cluster with a real SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from tlray import config
from tlray.data.prepare import prepare
from tlray.data.preprocess import to_model_input
from tlray.errors import TlrayError
from tlray.train import checkpoint
from tlray.train.finish import model_example_images
from tlray.train.plan import check_model, preflight
from tlray.train.protocol import EpochMetrics, Report, TestMetrics
from tlray.train.run import train
from tlray.train.steps import Evaluation

pytestmark = pytest.mark.ray

SMALL = ["--model.backbone=test_efficientnet", "--model.weights=none", "--data.image_size=32",
         "--data.batch_size=64", "--scaling.num_workers=2", "--scaling.cpus_per_worker=0.5",
         "--optim.lr=0.005"]


@pytest.fixture
def mnist(tlray_home):
    return prepare("builtin:mnist", progress=False)


def run_cfg(mnist, *extra):
    return config.load(None, SMALL + [f"--data.dataset={mnist.uri}", *extra])


def train_run(cfg):
    return train(preflight(cfg))


def test_two_worker_run_logs_everything(ray_cluster, mnist, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    cfg = run_cfg(mnist, "--train.epochs=2")
    result = train_run(cfg)

    ckpt = Path(result.checkpoint_path)
    assert (ckpt / "model.pt").is_file() and (ckpt / "test.json").is_file()
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert 0.0 <= result.metrics["test_acc"] <= 1.0 and result.metrics["test_auc"] > 0.5

    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.backbone"] == "test_efficientnet"
    assert run.data.tags["backbone"] == "test_efficientnet"
    assert run.data.tags["dataset_hash"] == mnist.fingerprint
    # Per-epoch metrics in MLflow equal what the workers reported, step = epoch.
    for key in ("train_loss", "val_loss", "val_acc", "val_auc", "img_per_s"):
        logged = {m.step: m.value for m in client.get_metric_history(result.run_id, key)}
        assert logged == pytest.approx({row["epoch"]: row[key] for row in result.history})
    assert run.data.metrics["test_acc"] == pytest.approx(result.metrics["test_acc"])
    assert any(k.startswith("system/") for k in run.data.metrics)  # system metrics

    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "dataset.json", "test_metrics.json", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert plots == {"plots/learning_curves.png", "plots/confusion_matrix.png",
                     "plots/test_predictions.png"}
    test_json = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/test_metrics.json"))
    assert np.array(test_json["confusion_matrix"]).sum() == mnist.splits["test"].rows

    # The logged model predicts exactly what the checkpoint predicts: the tensor network on
    # preprocessed batches, the pyfunc on the raw digits.
    logged = mlflow.pytorch.load_model(result.model_uri, device="cpu")
    model, minfo = check_model(cfg, mnist)
    model.load_state_dict(torch.load(ckpt / "model.pt", weights_only=True))
    model.eval()
    digits = model_example_images(mnist)
    x = to_model_input(torch.from_numpy(digits), minfo.data_config["mean"],
                       minfo.data_config["std"], (32, 32))
    x = torch.cat([x, x.flip(-1), x * 0.5])
    with torch.no_grad():
        torch.testing.assert_close(logged(x), model(x))
        expected = torch.softmax(model(x[:2]), dim=1).numpy()
    served = mlflow.pyfunc.load_model(result.model_uri).predict(digits[..., 0])
    np.testing.assert_allclose(served.filter(like="prob_").to_numpy(), expected, atol=1e-5)
    assert run.data.tags["mlflow_evaluate"].startswith("mlflow.models.evaluate on the 500")
    assert run.data.metrics["test_accuracy_score"] == pytest.approx(result.metrics["test_acc"])


def test_early_stopping_stops_a_stalled_run(ray_cluster, mnist):
    # Only the head trains (every BatchNorm frozen too, so no running statistics move), at a
    # learning rate too small to change a single prediction: val_acc stalls exactly.
    cfg = run_cfg(mnist, "--train.epochs=6", "--train.patience=1", "--train.monitor=val_acc",
                  "--optim.lr=1e-12", "--model.freeze=all", "--tracking.log_model=false",
                  "--scaling.num_workers=1", "--scaling.cpus_per_worker=1")
    result = train_run(cfg)
    assert result.metrics["stopped_early"] is True
    assert result.metrics["epochs_run"] == 2
    assert result.metrics["best_epoch"] == 1


def test_a_one_worker_run_repeats_exactly_with_the_same_seed(ray_cluster, mnist):
    # Same seed: same initial head, same block order, same row shuffle -> the same losses.
    cfg = run_cfg(mnist, "--train.epochs=2", "--scaling.num_workers=1",
                  "--tracking.log_model=false", "--train.seed=7")
    first, second = train_run(cfg), train_run(cfg)
    losses = [[(row["train_loss"], row["val_loss"]) for row in run.history]
              for run in (first, second)]
    assert losses[0] == losses[1]
    other = train_run(run_cfg(mnist, "--train.epochs=1", "--scaling.num_workers=1",
                                  "--tracking.log_model=false", "--train.seed=8"))
    assert other.history[0]["train_loss"] != first.history[0]["train_loss"]


def test_killed_worker_resumes_from_checkpoint(ray_cluster, mnist, monkeypatch):
    steps_per_epoch = -(-mnist.splits["train"].rows // 2 // 64)
    monkeypatch.setenv("TLRAY_TEST_FAULT", f"kill:rank=1:step={steps_per_epoch + 3}")
    cfg = run_cfg(mnist, "--train.epochs=2", "--scaling.max_failures=1",
                  "--tracking.log_model=false")
    result = train_run(cfg)
    state = json.loads((Path(result.checkpoint_path) / "state.json").read_text())
    assert state["resumed"] == 1  # really died once, and came back from epoch 1's checkpoint
    assert [row["epoch"] for row in state["history"]] == [1, 2]
    assert MlflowClient().get_run(result.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("checkpoint_every", ["0", "4"])
def test_a_resumed_run_trains_exactly_as_if_it_never_stopped(ray_cluster, mnist, monkeypatch,
                                                             checkpoint_every):
    # Dropout, augmentation and the data order all draw random numbers: a run SIGKILLed in
    # epoch 2 and resumed from epoch 1's checkpoint (or, with train.checkpoint_every, from
    # one inside epoch 2) must draw exactly what it would have, to the last weight.
    common = ("--train.epochs=3", "--scaling.num_workers=1", "--scaling.cpus_per_worker=1",
              "--scaling.max_failures=1", "--model.drop_rate=0.3", "--data.augment=digits",
              "--scaling.borrow_idle_cpus=false", f"--train.checkpoint_every={checkpoint_every}")
    whole = train_run(run_cfg(mnist, *common))
    steps_per_epoch = -(-mnist.splits["train"].rows // 64)
    monkeypatch.setenv("TLRAY_TEST_FAULT", f"kill:rank=0:step={steps_per_epoch + 10}")
    resumed = train_run(run_cfg(mnist, *common))

    state = json.loads((Path(resumed.checkpoint_path) / "state.json").read_text())
    assert state["resumed"] == 1  # it died in epoch 2, and came back
    measured = ("train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr")
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert {k: a[k] for k in measured} == {k: b[k] for k in measured}, a["epoch"]
    assert resumed.metrics["test_acc"] == whole.metrics["test_acc"]
    final = [torch.load(Path(r.checkpoint_path) / "model.pt", weights_only=True)
             for r in (whole, resumed)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    client = MlflowClient()  # every epoch's figures once, though epoch 2 ran in two parts
    assert [m.step for m in client.get_metric_history(resumed.run_id, "val_loss")] == [1, 2, 3]
    # Killed after step 10 of epoch 2: resumed from its end of epoch 1, or from step 8.
    assert state["resumed_at"] == [steps_per_epoch + (8 if checkpoint_every == "4" else 0)]


def test_bad_input_fails_before_training(ray_cluster, mnist):
    client_runs = lambda: MlflowClient().search_runs(  # noqa: E731
        [e.experiment_id for e in MlflowClient().search_experiments()])
    with pytest.raises(TlrayError, match="efficientnet_b99"):
        train_run(run_cfg(mnist, "--model.backbone=efficientnet_b99"))
    with pytest.raises(TlrayError, match="freeze"):
        train_run(run_cfg(mnist, "--model.freeze=99"))
    with pytest.raises(TlrayError, match="GPUs"):
        train_run(run_cfg(mnist, "--scaling.use_gpu=true"))
    with pytest.raises(TlrayError, match="does not exist"):
        train_run(run_cfg(mnist, "--data.dataset=/nonexistent/dataset"))
    assert client_runs() == []  # nothing was started


def test_resuming_from_the_final_checkpoint_skips_to_the_test(tmp_path):
    # A trial can die after its last report (while its model is being logged); Tune then
    # hands the final checkpoint back, which has the best weights and no optimizer state.
    model = torch.nn.Linear(4, 3)
    rows = [EpochMetrics(e, 0.5, 0.8, 0.4, 0.9 - e / 10, 0.95, 1e-3, 100.0, 1.0) for e in (1, 2)]
    state = checkpoint.TrainingState(epoch=2, step=10, best_value=0.8, best_epoch=1,
                                     trained=True, history=[vars(r) for r in rows])
    test = Evaluation(loss=0.1, acc=0.9, auc=0.95, rows=3, confusion=np.eye(3, dtype=np.int64),
                      predictions=(["r0", "r1", "r2"], np.arange(3), np.eye(3, dtype=np.float32)))
    final = Report(rows[0], "val_acc", 1, 0.8, final=True, test=TestMetrics(0.1, 0.9, 0.95, 3),
                   epochs_run=2, epochs_seconds=2.0)
    checkpoint.save_final(tmp_path, model, state, final, test, ["a", "b", "c"])

    fresh = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1)
    restored, best = checkpoint.load_training(tmp_path, fresh, optimizer, None)
    assert restored.trained and restored.epoch == 2 and restored.best_epoch == 1
    for name, value in model.state_dict().items():
        torch.testing.assert_close(best[name], value)
        torch.testing.assert_close(fresh.state_dict()[name], value)
    read = checkpoint.read_final(tmp_path, "val_acc")
    assert read.report == final  # the final report, exactly as the worker made it
    assert read.test["confusion_matrix"] == np.eye(3).tolist()


def test_a_checkpoint_of_an_older_tlray_is_refused_with_a_reason(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"epoch": 1, "step": 3}))
    with pytest.raises(TlrayError, match="older tlray"):
        checkpoint.load_training(tmp_path, torch.nn.Linear(2, 2), None, None)


def test_two_trials_progress_lines_reach_the_console_apart(capsys, monkeypatch):
    """Ray folds lines from different processes that differ only in numbers into one; a
    sweep's progress lines are kept apart (and labelled with their trial)."""
    from ray._private import ray_logging
    from ray._private.ray_logging import LogDeduplicator

    from tlray.train.cluster import keep_progress_lines_apart
    from tlray.train.progress import progress_line, say_line

    row = EpochMetrics(epoch=2, train_loss=0.5, train_acc=0.9, val_loss=0.4, val_acc=0.91,
                       val_auc=0.99, lr=1e-3, img_per_s=300.0, epoch_seconds=12.0)
    lines = []
    for trial in ("trial-ab_00001", "trial-ab_00002"):
        say_line(progress_line(row, 5), label=trial)
        lines.append(capsys.readouterr().out.rstrip("\n"))
    assert [line.split(":")[0] for line in lines] == ["trial-ab_00001", "trial-ab_00002"]

    monkeypatch.setattr(ray_logging, "RAY_DEDUP_LOGS", True)  # tests turn it off
    monkeypatch.delenv("RAY_DEDUP_LOGS_ALLOW_REGEX", raising=False)
    monkeypatch.setattr(ray_logging.stdout_deduplicator, "allow_re", None)
    keep_progress_lines_apart()  # what connecting to Ray does in the driver
    dedup = LogDeduplicator(5, ray_logging.stdout_deduplicator.allow_re.pattern, None,
                            _timesource=lambda: 0)
    shown = []
    for pid, line in enumerate(lines + ["Some warning 1", "Some warning 2"]):
        for batch in dedup.deduplicate({"ip": "x", "pid": pid % 2, "lines": [line]}):
            shown += batch["lines"]
    assert shown == [*lines, "Some warning 1"]  # Ray's own duplicates are still folded
