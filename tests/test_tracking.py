"""tlray.track (store, runs, params, run metrics, figures) against a real SQLite MLflow store in a
temporary TLRAY_HOME (no mocks)."""

from __future__ import annotations

import logging
import math
import socket
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from tlray.errors import TlrayError
from tlray.track import figures, params, run_metrics, runs, store


def _status(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.status


# --------------------------------------------------------------------------- store, server


def test_default_store_is_absolute_sqlite_under_home(tlray_home: Path) -> None:
    uri = store.configure()
    assert uri == f"sqlite:///{tlray_home}/mlflow.db"
    assert Path(uri.removeprefix("sqlite:///")).is_absolute()
    assert mlflow.get_tracking_uri() == uri
    assert store.ui_command() == f"mlflow ui --backend-store-uri {uri}"


def test_experiment_gets_absolute_artifact_location_under_home(tlray_home: Path) -> None:
    experiment_id = runs.get_or_create_experiment("tlray/mnist")
    assert runs.get_or_create_experiment("tlray/mnist") == experiment_id
    location = MlflowClient().get_experiment(experiment_id).artifact_location
    assert Path(location).is_absolute()
    assert Path(location).is_relative_to(tlray_home / "mlartifacts")


def test_deleted_experiment_is_a_clear_error(tlray_home: Path) -> None:
    experiment_id = runs.get_or_create_experiment("gone")
    MlflowClient().delete_experiment(experiment_id)
    with pytest.raises(TlrayError, match="gone.*deleted"):
        runs.get_or_create_experiment("gone")


def test_explicit_tracking_uri_wins(tlray_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert store.tracking_uri() == "http://mlflow.example:5000"
    assert store.default_artifact_location("x") is None  # the server decides
    assert "http://mlflow.example:5000" in store.ui_command()


def test_unreachable_server_fails_fast() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(TlrayError, match=f"127.0.0.1:{port}.*unreachable"):
        store.check_tracking_server(uri)


# --------------------------------------------------------------------------- run status


def test_successful_block_ends_finished(tlray_home: Path) -> None:
    with runs.start_run("status", run_name="ok", tags={"k": 1}) as run:
        assert _status(run.info.run_id) == "RUNNING"
    assert _status(run.info.run_id) == "FINISHED"
    assert MlflowClient().get_run(run.info.run_id).data.tags["k"] == "1"
    assert mlflow.active_run() is None


def test_exception_ends_failed_and_propagates(tlray_home: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with runs.start_run("status") as run:
            raise RuntimeError("boom")
    assert _status(run.info.run_id) == "FAILED"
    assert mlflow.active_run() is None


def test_keyboard_interrupt_ends_killed(tlray_home: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with runs.start_run("status") as run:
            raise KeyboardInterrupt
    assert _status(run.info.run_id) == "KILLED"


def test_nested_run_left_open_is_ended_too(tlray_home: Path) -> None:
    with runs.start_run("status") as run:
        leaked = mlflow.start_run(nested=True)
    assert _status(leaked.info.run_id) == "FINISHED"
    assert _status(run.info.run_id) == "FINISHED"
    assert mlflow.active_run() is None


def test_child_runs_carry_parent_tag(tlray_home: Path) -> None:
    with runs.start_run("sweep", run_name="sweep") as parent:
        with runs.start_run("sweep", run_name="in-process trial") as child:
            pass
    parent_id = parent.info.run_id
    assert MlflowClient().get_run(child.info.run_id).data.tags[MLFLOW_PARENT_RUN_ID] == parent_id

    # A trial in another process only knows the parent's id; the parent has ended meanwhile.
    with runs.start_run("sweep", parent_run_id=parent_id) as remote:
        pass
    assert MlflowClient().get_run(remote.info.run_id).data.tags[MLFLOW_PARENT_RUN_ID] == parent_id
    assert _status(remote.info.run_id) == "FINISHED"


def test_close_dangling_runs_ends_running_descendants(tlray_home: Path) -> None:
    client = MlflowClient()
    experiment_id = runs.get_or_create_experiment("dangling")
    with runs.start_run("dangling") as parent:
        pass
    parent_id = parent.info.run_id

    def child(of: str) -> str:  # what a trial killed by ASHA leaves behind
        return client.create_run(experiment_id, tags={MLFLOW_PARENT_RUN_ID: of}).info.run_id

    stopped, other = child(parent_id), child(parent_id)
    grandchild = child(stopped)
    done = child(parent_id)
    client.set_terminated(done, "FINISHED")
    unrelated = client.create_run(experiment_id).info.run_id

    closed = runs.close_dangling_runs(parent_run_id=parent_id)
    assert sorted(closed) == sorted([stopped, other, grandchild])
    assert {_status(r) for r in (stopped, other, grandchild)} == {"KILLED"}
    assert _status(done) == "FINISHED"
    assert _status(unrelated) == "RUNNING"

    assert runs.close_dangling_runs(experiment_id=experiment_id, status="FAILED") == [unrelated]
    assert _status(unrelated) == "FAILED"


def test_end_run_with_status(tlray_home: Path) -> None:
    experiment_id = runs.get_or_create_experiment("manual")
    run_id = MlflowClient().create_run(experiment_id).info.run_id
    runs.end_run_with_status(run_id, "killed")
    assert _status(run_id) == "KILLED"
    with pytest.raises(TlrayError, match="status"):
        runs.end_run_with_status(run_id, "DONE")
    with pytest.raises(TlrayError, match="exactly one"):
        runs.close_dangling_runs()


# --------------------------------------------------------------------------- params, metrics


def test_log_config_flattens_params_in_batches_and_saves_yaml(tlray_home: Path) -> None:
    config = {
        "model": {"backbone": "resnet18", "freeze_depth": 2, "head": {"dropout": 0.1}},
        "train": {"lr": 1e-3, "epochs": 5, "path": Path("/data/x")},
        "many": {f"k{i}": i for i in range(150)},  # > 100 params: needs several batches
        "long": "x" * 7000,
        "empty": {},
        "tags": ["a", "b"],
    }
    with runs.start_run("config") as run:
        params.log_config(config)
    data = MlflowClient().get_run(run.info.run_id).data
    assert data.params["model.backbone"] == "resnet18"
    assert data.params["model.head.dropout"] == "0.1"
    assert data.params["train.lr"] == "0.001"
    assert data.params["train.path"] == "/data/x"
    assert data.params["many.k149"] == "149"
    assert len(data.params["long"]) == 6000
    assert data.params["tags"] == "['a', 'b']"
    assert len(data.params) == 6 + 150 + 3  # "empty": {} stays one param

    saved = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
    reloaded = yaml.safe_load(saved)
    assert reloaded["model"]["head"]["dropout"] == 0.1
    assert reloaded["long"] == "x" * 7000  # the artifact keeps the full value
    assert reloaded["train"]["path"] == "/data/x"


def test_epoch_metrics_logged_per_step_and_non_finite_skipped(
    tlray_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [
        {"train_loss": 1.0, "val_acc": 0.5},
        {"train_loss": 0.5, "val_acc": 0.75},
        {"train_loss": math.nan, "val_acc": np.float32(0.875)},
    ]
    with runs.start_run("metrics") as run:
        with caplog.at_level(logging.WARNING, logger="tlray.track.run_metrics"):
            for epoch, row in enumerate(rows):
                run_metrics.log_epoch_metrics(row, epoch)
            assert run_metrics.log_epoch_metrics({"val_auc": math.inf}, 3) == {}
    assert "train_loss" in caplog.text and "not finite" in caplog.text

    client = MlflowClient()
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in loss) == [(0, 1.0), (1, 0.5)]
    acc = client.get_metric_history(run.info.run_id, "val_acc")
    assert sorted((m.step, m.value) for m in acc) == [(0, 0.5), (1, 0.75), (2, 0.875)]
    assert client.get_metric_history(run.info.run_id, "val_auc") == []
    assert _status(run.info.run_id) == "FINISHED"


def test_log_figure_writes_png_artifact(tlray_home: Path) -> None:
    from tlray.track import plots

    fig = plots.learning_curves([{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}])
    with runs.start_run("figures") as run:
        figures.log_figure(fig, "plots/curves.png")
    names = [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots")]
    assert names == ["plots/curves.png"]


def test_tags_and_git_commit(tmp_path: Path) -> None:
    assert params.git_commit(tmp_path) is None  # not a checkout: None, no exception
    tags = params.standard_tags("resnet18", "imagenet", 2, "abc123")
    assert tags["backbone"] == "resnet18" and tags["freeze"] == "2"
    assert tags["dataset_hash"] == "abc123" and tags["weights"] == "imagenet"
