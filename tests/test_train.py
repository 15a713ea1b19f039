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



def run_cfg(data, *extra):
    return config.load(None, SMALL + [f"--data.dataset={data.uri}", *extra])


def train_run(cfg):
    return train(preflight(cfg))


def test_a_two_worker_run_survives_a_killed_worker_and_logs_everything(ray_cluster, few_digits,
                                                                        monkeypatch):
    # Rank 1 is SIGKILLed after step 6 of epoch 2; Ray Train restarts both workers from the
    # checkpoint written inside that epoch after its step 4 (train.checkpoint_every=4), and
    # the run goes on as one MLflow run. That the resumed run trains exactly what it would
    # have is the loop's property (test_loop.py); here: Ray's side, and what gets logged.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    steps_per_epoch = -(-few_digits.splits["train"].rows // 2 // 64)
    monkeypatch.setenv("TLRAY_TEST_FAULT", f"kill:rank=1:step={steps_per_epoch + 6}")
    cfg = run_cfg(few_digits, "--train.epochs=2", "--scaling.max_failures=1",
                  "--train.checkpoint_every=4")
    result = train_run(cfg)

    ckpt = Path(result.checkpoint_path)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["resumed"] == 1 and state["resumed_at"] == [steps_per_epoch + 4]
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert 0.0 <= result.metrics["test_acc"] <= 1.0 and result.metrics["test_auc"] > 0.5

    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.backbone"] == "test_efficientnet"
    assert run.data.tags["backbone"] == "test_efficientnet"
    assert run.data.tags["dataset_hash"] == few_digits.fingerprint
    # Per-epoch metrics in MLflow equal what the workers reported, step = epoch, each epoch
    # once although epoch 2 ran in two parts.
    for key in ("train_loss", "val_loss", "val_acc", "val_auc", "img_per_s"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, key))
        assert [step for step, _ in logged] == [row["epoch"] for row in result.history]
        assert [value for _, value in logged] == pytest.approx([row[key]
                                                                for row in result.history])
    assert run.data.metrics["test_acc"] == pytest.approx(result.metrics["test_acc"])
    assert any(k.startswith("system/") for k in run.data.metrics)  # system metrics

    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "dataset.json", "test_metrics.json", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert plots == {"plots/samples.png", "plots/learning_curves.png",
                     "plots/confusion_matrix.png", "plots/test_predictions.png"}
    test_json = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/test_metrics.json"))
    assert np.array(test_json["confusion_matrix"]).sum() == few_digits.splits["test"].rows

    # The logged model predicts exactly what the checkpoint predicts: the tensor network on
    # preprocessed batches, the pyfunc on the raw digits.
    logged = mlflow.pytorch.load_model(result.model_uri, device="cpu")
    model, minfo = check_model(cfg, few_digits)
    model.load_state_dict(torch.load(ckpt / "model.pt", weights_only=True))
    model.eval()
    digits = model_example_images(few_digits)
    x = to_model_input(torch.from_numpy(digits), minfo.data_config["mean"],
                       minfo.data_config["std"], (32, 32))
    x = torch.cat([x, x.flip(-1), x * 0.5])
    with torch.no_grad():
        torch.testing.assert_close(logged(x), model(x))
        expected = torch.softmax(model(x[:2]), dim=1).numpy()
    served = mlflow.pyfunc.load_model(result.model_uri).predict(digits[..., 0])
    np.testing.assert_allclose(served.filter(like="prob_").to_numpy(), expected, atol=1e-5)
    assert run.data.tags["mlflow_evaluate"].startswith(
        f"mlflow.models.evaluate on the {few_digits.splits['test'].rows}")
    assert run.data.metrics["test_accuracy_score"] == pytest.approx(result.metrics["test_acc"])


def test_a_one_worker_cpu_run_trains_in_the_driver_and_resumes_a_failure_there(
        ray_cluster, few_digits, monkeypatch, capsys):
    # One worker, no GPU, one node: the loop runs in this process (no Ray Train controller
    # or worker actor starts). It fails once after step 6 of epoch 2 and resumes, in this
    # process, from the checkpoint written inside that epoch after its step 4.
    from ray.util.state import list_actors

    def controllers() -> int:
        return len(list_actors(filters=[("class_name", "=", "TrainController")],
                               limit=10_000, raise_on_missing_output=False))

    steps_per_epoch = -(-few_digits.splits["train"].rows // 64)
    monkeypatch.setenv("TLRAY_TEST_FAULT", f"fail:rank=0:step={steps_per_epoch + 6}")
    cfg = run_cfg(few_digits, "--scaling.num_workers=1", "--train.epochs=2",
                  "--scaling.max_failures=1", "--train.checkpoint_every=4",
                  "--train.keep_checkpoints=1", "--tracking.log_model=false")
    before = controllers()
    result = train_run(cfg)
    assert controllers() == before

    out = capsys.readouterr().out
    assert ("training failed (RuntimeError: test failure at step "
            f"{steps_per_epoch + 6}); resuming from the latest checkpoint (failure 1, "
            "scaling.max_failures 1)") in out
    ckpt = Path(result.checkpoint_path)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["resumed"] == 1 and state["resumed_at"] == [steps_per_epoch + 4]
    assert [row["epoch"] for row in result.history] == [1, 2]
    client = MlflowClient()
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "val_loss")] == [1, 2]
    # Ray Train's keeping, by this process: the best (by val_loss) and the latest, the final.
    kept = sorted(p.name for p in ckpt.parent.glob("checkpoint_*"))
    assert ckpt.name == kept[-1] and 1 <= len(kept) <= 2, kept


def test_checkpoints_kept_in_the_driver_are_the_best_few_and_the_latest(tmp_path):
    from ray.train import Checkpoint

    from tlray.train.in_driver import CheckpointKeeper

    keeper = CheckpointKeeper(tmp_path / "run", 2, "val_loss", "min")
    assert keeper.latest() is None
    source = tmp_path / "written"
    for i, loss in enumerate([0.9, 0.5, 0.7, None, 0.8]):
        source.mkdir()
        (source / "i").write_text(str(i))
        keeper.report({} if loss is None else {"val_loss": loss},
                      Checkpoint.from_directory(str(source)))
        keeper.report({"val_loss": 0.1})  # metrics alone: nothing kept
        (source / "i").unlink()
        source.rmdir()
    kept = {p.name: (p / "i").read_text() for p in (tmp_path / "run").iterdir()}
    # The best two by val_loss (0.5, 0.7) and the latest (0.8); the rest deleted.
    assert kept == {"checkpoint_000001": "1", "checkpoint_000002": "2",
                    "checkpoint_000004": "4"}
    assert Path(keeper.latest().path).name == "checkpoint_000004"


def test_bad_input_fails_before_training(ray_cluster, few_digits):
    client_runs = lambda: MlflowClient().search_runs(  # noqa: E731
        [e.experiment_id for e in MlflowClient().search_experiments()])
    with pytest.raises(TlrayError, match="efficientnet_b99"):
        train_run(run_cfg(few_digits, "--model.backbone=efficientnet_b99"))
    with pytest.raises(TlrayError, match="freeze"):
        train_run(run_cfg(few_digits, "--model.freeze=99"))
    with pytest.raises(TlrayError, match="GPUs"):
        train_run(run_cfg(few_digits, "--scaling.use_gpu=true"))
    with pytest.raises(TlrayError, match="does not exist"):
        train_run(run_cfg(few_digits, "--data.dataset=/nonexistent/dataset"))
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


def tidy_as_the_driver(monkeypatch) -> None:
    """Ray's console rules for workers' lines as connecting to Ray sets them in the driver,
    from Ray's defaults and no user regex; restored after the test."""
    from ray._private import ray_logging

    from tlray.train.cluster import tidy_worker_lines

    monkeypatch.setattr(ray_logging, "RAY_DEDUP_LOGS", True)  # tests turn it off
    for variable in ("RAY_DEDUP_LOGS_ALLOW_REGEX", "RAY_DEDUP_LOGS_SKIP_REGEX"):
        monkeypatch.delenv(variable, raising=False)
    for deduplicator in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        monkeypatch.setattr(deduplicator, "allow_re", None)
        monkeypatch.setattr(deduplicator, "skip_re", None)
    tidy_worker_lines()


def test_two_trials_progress_lines_reach_the_console_apart(capsys, monkeypatch):
    """Ray folds lines from different processes that differ only in numbers into one; a
    sweep's progress lines are kept apart (and labelled with their trial)."""
    from ray._private import ray_logging
    from ray._private.ray_logging import LogDeduplicator

    from tlray.train.progress import progress_line, say_line

    row = EpochMetrics(epoch=2, train_loss=0.5, train_acc=0.9, val_loss=0.4, val_acc=0.91,
                       val_auc=0.99, lr=1e-3, img_per_s=300.0, epoch_seconds=12.0)
    lines = []
    for trial in ("trial-ab_00001", "trial-ab_00002"):
        say_line(progress_line(row, 5), label=trial)
        lines.append(capsys.readouterr().out.rstrip("\n"))
    assert [line.split(":")[0] for line in lines] == ["trial-ab_00001", "trial-ab_00002"]

    tidy_as_the_driver(monkeypatch)
    dedup = LogDeduplicator(5, ray_logging.stdout_deduplicator.allow_re.pattern, None,
                            _timesource=lambda: 0)
    shown = []
    for pid, line in enumerate(lines + ["Some warning 1", "Some warning 2"]):
        for batch in dedup.deduplicate({"ip": "x", "pid": pid % 2, "lines": [line]}):
            shown += batch["lines"]
    assert shown == [*lines, "Some warning 1"]  # Ray's own duplicates are still folded


def test_ray_noise_stays_out_of_the_console_and_other_errors_reach_it(monkeypatch):
    from ray._private import ray_logging
    from ray._private.ray_logging import LogDeduplicator

    tidy_as_the_driver(monkeypatch)
    dedup = LogDeduplicator(5, None, ray_logging.stderr_deduplicator.skip_re.pattern,
                            _timesource=lambda: 0)
    noise = ("[2026-12-07 07:11:02,171 E 6542 6572] core_worker.cc:2465: Actor with class "
             "name: 'PreemptionWatcher' and ID: '8929e749ec11770964dfd2ce01000000' has "
             "constructor arguments in the object store and max_restarts > 0. If the "
             "arguments in the object store go out of scope or are lost, the actor restart "
             "will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")
    other = ("[2026-12-07 07:11:02,171 E 6542 6572] core_worker.cc:2465: Actor with class "
             "name: 'Mine' and ID: '00' has constructor arguments in the object store")
    (batch,) = dedup.deduplicate({"ip": "x", "pid": 1, "lines": [noise, other, "Traceback"]})
    assert batch["lines"] == [other, "Traceback"]


def test_ray_datas_usage_poller_logs_no_debug_traceback(monkeypatch):
    """Ray Data's usage poller fails every 10 s without Prometheus and logs it at DEBUG,
    traceback included: a traceback in the log file every 10 s, and one on the console when
    the process ends as the poller logs. tlray's Ray Data logging stops it; Ray Data's own
    debug lines still reach its log file."""
    import logging

    from ray.data._internal.logging import configure_logging

    from tlray.train.cluster import ray_data_logging_config

    monkeypatch.setenv("RAY_DATA_LOGGING_CONFIG", ray_data_logging_config())
    monkeypatch.delenv("RAY_DATA_LOG_LEVEL", raising=False)
    configure_logging()
    assert not logging.getLogger("ray.data._internal.usage.util").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("ray.data._internal.usage.util").isEnabledFor(logging.INFO)
    assert logging.getLogger("ray.data._internal.execution").isEnabledFor(logging.DEBUG)
