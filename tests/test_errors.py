"""How a command fails: a bug keeps its cause, a user's mistake is one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import mlflow
import pytest
from mlflow import MlflowClient

from cluster_helpers import ctrl_c_as_in_a_terminal, driver_env


SMALL = ["--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32",
         "--scaling.num_workers", "1", "--scaling.cpus_per_worker", "0.5",
         "--scaling.max_failures", "0", "--tracking.log_model", "false"]


def test_an_internal_error_keeps_its_cause_and_its_whole_traceback(ray_cluster, tlray_home,
                                                                   few_digits, monkeypatch,
                                                                   capsys):
    from tlray.cli.main import main

    info = few_digits
    monkeypatch.setenv("TLRAY_TEST_FAULT", "raise:rank=0:step=2")
    assert main(["train", "--data", info.uri, *SMALL, "--epochs", "1"]) == 1
    stderr = capsys.readouterr().err
    report = stderr[stderr.index("tlray: internal error"):]
    assert "KeyError: 'test fault at step 2'" in report.splitlines()[0]
    # The innermost frame, where it was raised, by file and line.
    assert re.search(r"tlray/train/faults\.py:\d+ in maybe_fail", report), report
    assert "full traceback: artifact error.txt of MLflow run" in report

    client = MlflowClient(f"sqlite:///{tlray_home}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED" and run.info.run_id in report
    mlflow.set_tracking_uri(f"sqlite:///{tlray_home}/mlflow.db")
    trace = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/error.txt")
    assert "KeyError" in trace and "faults.py" in trace and "train_loop_per_worker" in trace


@pytest.mark.parametrize("command", ["train", "tune", "compare", "lr-find"])
def test_a_missing_dataset_is_one_line_before_torch_ray_or_mlflow_load(command, tmp_path):
    code = ("import sys; from tlray.cli.main import main; rc = main(sys.argv[1:]); "
            "print(sorted({'torch', 'ray', 'mlflow', 'timm'} & set(sys.modules))); sys.exit(rc)")
    missing = subprocess.run([sys.executable, "-c", code, command, "--data",
                              str(tmp_path / "nowhere")], capture_output=True, text=True,
                             env={**os.environ, "TLRAY_HOME": str(tmp_path)}, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.startswith("tlray: error: source") and "does not exist" in \
        missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert missing.stdout.strip() == "[]"  # it failed before loading any of them


def test_ctrl_c_ends_a_training_run_with_one_line_and_status_130(ray_cluster, tlray_home,
                                                                 few_digits):
    import signal
    import time

    info = few_digits
    driver = subprocess.Popen([sys.executable, "-m", "tlray.cli", "train", "--data", info.uri,
                               *SMALL, "--epochs", "20"], env=driver_env(ray_cluster, tlray_home),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, preexec_fn=ctrl_c_as_in_a_terminal)
    client = MlflowClient(f"sqlite:///{tlray_home}/mlflow.db")

    def first_epoch_logged():
        try:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        except Exception:  # noqa: BLE001 - the store is being created
            return False
        return bool(runs and client.get_metric_history(runs[0].info.run_id, "val_acc"))

    deadline = time.time() + 400
    while not first_epoch_logged():
        assert time.time() < deadline and driver.poll() is None, driver.stderr.read()[-3000:]
        time.sleep(1)
    os.killpg(driver.pid, signal.SIGINT)
    _, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 130
    assert stderr.strip().splitlines()[-1] == "tlray: interrupted"
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"


def test_a_test_fault_with_a_typo_fails_at_once_and_a_hold_waits_only_in_a_one_worker_run(
        tmp_path, monkeypatch):
    from tlray.train import faults

    monkeypatch.setenv(faults.ENV, "hold:rank=0:step=3")  # a hold needs its until=PATH
    with pytest.raises(ValueError, match="until=PATH"):
        faults.from_env()
    release = tmp_path / "go"
    spec = f"hold:rank=0:step=3:until={release}"
    # Two workers pass the step; one worker at another step or rank is not held either.
    faults.maybe_fail(spec, rank=0, step=3, restart_key="run", world=2)
    faults.maybe_fail(spec, rank=0, step=4, restart_key="run", world=1)
    faults.maybe_fail(spec, rank=1, step=3, restart_key="run", world=1)
