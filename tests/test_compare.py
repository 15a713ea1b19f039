"""`tlray compare`: transfer vs scratch_cnn as two real nested Ray Train runs in real MLflow."""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tlray import config
from tlray.compare.experiment import compare
from tlray.compare.report import COLUMNS, format_comparison
from tlray.errors import TlrayError

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model.backbone=test_efficientnet", "--model.weights=none", "--data.image_size=32",
         "--data.batch_size=64", "--scaling.num_workers=1", "--scaling.cpus_per_worker=0.5",
         "--train.epochs=1", "--tracking.log_model=false"]


def load_job():
    spec = importlib.util.spec_from_file_location("compare_scratch",
                                                  ROOT / "jobs" / "compare_scratch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.ray
def test_compare_logs_two_nested_runs_and_a_table(ray_cluster, few_digits):
    cfg = config.load(None, SMALL + [f"--data.dataset={few_digits.uri}"])
    result = compare(cfg, scratch_overrides=["optim.lr=0.002"], progress=False)

    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(children) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    by_role = {c.data.tags["compare_role"]: c for c in children}
    transfer, scratch = by_role["transfer"], by_role["scratch"]
    assert transfer.data.params["model.backbone"] == "test_efficientnet"
    assert scratch.data.params["model.backbone"] == "scratch_cnn"
    assert scratch.data.params["model.weights"] == "none"
    # The same splits and budget; only the scratch override differs.
    for key in ("data.dataset", "data.image_size", "data.batch_size", "train.epochs",
                "train.seed", "optim.name"):
        assert transfer.data.params[key] == scratch.data.params[key], key
    assert transfer.data.params["data.dataset"] == few_digits.uri
    lrs = [float(run.data.params["optim.lr"]) for run in (transfer, scratch)]
    assert lrs[1] == 0.002 != lrs[0]

    # comparison.csv: one row per model, equal to what each child run logged.
    text = mlflow.artifacts.load_text(f"runs:/{result.parent_run_id}/comparison.csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert tuple(rows[0]) == COLUMNS
    assert [r["model"] for r in rows] == ["transfer", "scratch"]
    for row in rows:
        child = by_role[row["model"]]
        assert row["run_id"] == child.info.run_id
        assert row["backbone"] == child.data.params["model.backbone"]
        for key in ("test_acc", "test_auc", "test_loss"):
            assert float(row[key]) == pytest.approx(child.data.metrics[key]), key
            assert parent.data.metrics[f"{row['model']}_{key}"] == pytest.approx(float(row[key]))
        assert int(row["trainable_params"]) == int(child.data.params["model.trainable_params"])
        epoch_seconds = [m.value for m in
                         client.get_metric_history(child.info.run_id, "epoch_seconds")]
        assert float(row["seconds_per_epoch"]) == pytest.approx(np.mean(epoch_seconds))

    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"comparison.csv", "comparison.md", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert plots == {"plots/comparison.png", "plots/samples.png"}
    png = mlflow.artifacts.download_artifacts(f"runs:/{result.parent_run_id}/plots/comparison.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = format_comparison(result)
    for word in ("transfer", "scratch", "test_efficientnet", "scratch_cnn",
                 result.parent_run_id, f"{result.transfer.test_acc:.4f}",
                 f"{result.scratch.test_acc:.4f}"):
        assert word in table


def test_bad_input_fails_before_anything_is_started(tlray_home, capsys):
    with pytest.raises(TlrayError, match="nothing to compare"):
        compare(config.load(None, ["--model.backbone=scratch_cnn", "--model.weights=none"]))
    with pytest.raises(TlrayError, match="data.image_size"):  # would break like for like
        compare(config.load(None, SMALL), scratch_overrides=["data.image_size=64"])
    with pytest.raises(TlrayError, match="optim.lr"):
        compare(config.load(None, SMALL), scratch_overrides=["optim.lr=-1"])

    job = load_job()
    assert job.main(["--model.backbone=scratch_cnn", "--model.weights=none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compare_scratch.py: error: --model.backbone=")
    assert "nothing to compare" in err[0]
    with pytest.raises(SystemExit) as typo:
        job.main(["--smok"])  # a typo is not an override
    assert typo.value.code == 2 and "unrecognized arguments: --smok" in capsys.readouterr().err
    # Nothing was prepared (the home holds only the digits it started with), tracked or
    # trained.
    assert [p.name for p in (tlray_home / "datasets").iterdir()] == ["mnist-builtin"]
    assert not (tlray_home / "ray_results").exists()
    assert not MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()])


def test_the_scratch_model_trains_on_the_same_augmented_data():
    from tlray.compare.experiment import scratch_config

    cfg = config.load(None, ["--data.augment=microscopy", "--data.augment_scale=0.05",
                             "--data.image_size=128"])
    scratch = scratch_config(cfg, ["optim.lr=3e-4"])
    assert scratch.data == cfg.data  # augmentation included: a like-for-like comparison
    assert scratch.model.backbone != cfg.model.backbone and scratch.optim.lr == 3e-4
