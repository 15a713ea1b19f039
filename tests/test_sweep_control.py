"""A sweep a person controls: Ctrl-C pauses it, --resume continues it (after a pause, or after
its driver was killed), a goal stops it, --more grows it, and its summary says which settings
mattered."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cluster_helpers import ctrl_c_as_in_a_terminal, driver_env

from tlray import config
from tlray.tune import sweep
from tlray.tune.pick import format_summary

pytestmark = pytest.mark.ray

SMALL = ["--model.backbone=test_efficientnet", "--model.weights=none", "--data.image_size=32",
         "--scaling.num_workers=1", "--scaling.cpus_per_worker=0.5", "--train.epochs=2",
         "--train.monitor=val_acc", "--tune.freeze=0,2,all", "--tune.lr_min=1e-3",
         "--tune.lr_max=1e-2", "--tune.grace_period=2", "--tune.registered_name=digits",
         "--scaling.borrow_idle_cpus=false",
         "--tracking.evaluate=never"]  # mlflow.models.evaluate: test_train and test_serving


def children(parent_run_id=None):
    """Every trial run so far, oldest first (all of them when there is no parent yet)."""
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'" if parent_run_id else \
        "tags.mlflow.parentRunId != ''"
    return client.search_runs(experiments, query, order_by=["attributes.start_time ASC"])


def epochs_logged(run) -> list[int]:
    return [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_acc")]


def start_sweep(args, ray_cluster, home, log, stderr=subprocess.PIPE):
    return subprocess.Popen([sys.executable, "-m", "tlray.cli", "tune", *args],
                            env=driver_env(ray_cluster, home), stdout=log,
                            stderr=stderr, text=True, start_new_session=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)


def wait_for(condition, driver, what: str, timeout: float = 400):
    deadline = time.time() + timeout
    while time.time() < deadline and driver.poll() is None:
        found = condition()
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"{what} did not happen (driver exit code {driver.poll()})")


def terminated_trials(sweep_dir: Path) -> set[str]:
    """The trials Tune's saved experiment state records as finished (what a resume trusts)."""
    done = set()
    for state_file in sweep_dir.glob("experiment_state-*.json"):
        try:
            trials = [json.loads(t[0]) for t in json.loads(state_file.read_text())["trial_data"]]
        except (OSError, ValueError, KeyError):
            continue  # being written
        done |= {t["trial_id"] for t in trials if t.get("status") == "TERMINATED"}
    return done


def test_a_paused_sweep_and_a_killed_driver_both_resume_and_train_nothing_twice(
        ray_cluster, mnist, tmp_path, tlray_home):
    # Dropout and augmentation draw random numbers too: all must follow from the epoch.
    args = [*SMALL, "--tune.freeze=2", "--model.drop_rate=0.2", "--data.augment=digits",
            f"--data.dataset={mnist.uri}", "--tune.num_samples=2", "--tune.max_concurrent=1",
            "--tune.name=paused"]
    driver = start_sweep(args, ray_cluster, tlray_home, open(tmp_path / "driver.log", "w"))

    # Ctrl-C once the first trial has reported an epoch (of 2).
    def first_running():
        runs = children()
        return len(runs) == 1 and epochs_logged(runs[0]) and runs[0]

    first = wait_for(first_running, driver, "trial 1's first epoch")
    os.killpg(driver.pid, signal.SIGINT)
    _, stderr = driver.communicate(timeout=300)

    assert driver.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("tlray: interrupted: 1 of 2 trials have progress saved; continue "
                           "with: python -m tlray.cli tune ") and last.endswith(" --resume")
    assert "Tuner.restore" not in stderr  # Ray's own hint stays out of the console
    assert {r.info.status for r in children()} <= {"FINISHED", "KILLED"}
    parent = MlflowClient().get_run(first.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"
    assert not MlflowClient().search_registered_models()  # half a sweep registers nothing

    # The command the line gives, run as a person would: in a new driver process. That one
    # is SIGKILLed (no pause, no goodbye) once Tune has saved the paused trial as finished:
    # the second trial, started after it, is then the one a third driver finishes.
    command = [sys.executable, *shlex.split(last.split("continue with: ", 1)[1])[1:]]
    assert command[1:4] == ["-m", "tlray.cli", "tune"]
    log = open(tmp_path / "resumed.log", "w")
    resumed = start_sweep(command[4:], ray_cluster, tlray_home, log, stderr=log)
    sweep_dir = tlray_home / "ray_results" / "paused"
    trial_1 = first.data.tags["tune_trial_id"]
    wait_for(lambda: trial_1 in terminated_trials(sweep_dir), resumed, "trial 1 saved as done")
    os.killpg(resumed.pid, signal.SIGKILL)
    resumed.wait()

    again = subprocess.run(command, capture_output=True, text=True,
                           env=driver_env(ray_cluster, tlray_home), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert MlflowClient().get_run(parent.info.run_id).info.status == "FINISHED"
    (version,) = MlflowClient().search_model_versions("name = 'digits'")
    assert int(version.version) == 1
    runs = children(parent.info.run_id)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert all("test_acc" in r.data.metrics for r in finished)
    per_trial = Counter(r.data.tags["tune_trial_id"] for r in finished)
    assert len(per_trial) == 2 and set(per_trial.values()) == {1}  # none trained to the end twice
    # The paused trial's epochs: each trained once, before the pause or after it.
    paused = [r for r in runs if r.data.tags["tune_trial_id"] == trial_1]
    assert sorted(e for r in paused for e in epochs_logged(r)) == [1, 2]

    # A trial's page says what ran it and what it was, not Ray's worker process.
    for run in finished:
        tags = run.data.tags
        assert tags["mlflow.source.name"].startswith("python -m tlray.cli tune ")
        assert "--tune.name=paused" in tags["mlflow.source.name"]
        assert tags["freeze"] == "2" == run.data.params["model.freeze"]
        assert re.fullmatch(r"freeze `2`, lr [0-9.e-]+: trained all 2 epochs, best val_acc "
                            r"[0-9.]+, test accuracy [0-9.]+(; the sweep's pick)?",
                            tags["mlflow.note.content"]), tags["mlflow.note.content"]
    assert sum("the sweep's pick" in r.data.tags["mlflow.note.content"] for r in finished) == 1


def test_a_goal_stops_the_sweep_and_more_trials_grow_it(ray_cluster, few_digits):
    args = [*SMALL, f"--data.dataset={few_digits.uri}", "--tune.num_samples=3",
            "--tune.max_concurrent=1", "--tune.name=grown", "--tune.goal=0.15"]
    first = sweep.sweep(config.load(None, args))
    # The first trial reaches 15% validation accuracy in its first epoch: it is tested and
    # registered, and the other two never start.
    assert first.trials[0]["status"] == "COMPLETED" and len(first.trials) < 3
    assert all(t["status"] == "NOT STARTED (goal)" for t in first.trials[1:])
    assert first.goal_trial == first.trials[0]["trial_id"] and first.trials[0]["epochs"] == 1
    assert first.registered is not None
    summary = format_summary(first, "val_acc")
    assert "the goal stopped the sweep" in summary
    assert "too few trials (1 with a result)" in summary

    # Grown by three: the same parent run, the finished trial kept, new settings tried;
    # each new trial logs its own model this time (the first one's, the pick's, is there).
    grown_args = [a for a in args if not a.startswith("--tune.goal")]
    grown = sweep.sweep(config.load(None, grown_args + ["--tune.log_models=all"]), more=3)
    runs = children(grown.parent_run_id)
    assert grown.parent_run_id == first.parent_run_id and len(runs) == 4
    assert runs[0].info.run_id == first.trials[0]["mlflow_run_id"]  # not trained again
    completed = [t for t in grown.trials if t["status"] == "COMPLETED"]
    assert len(completed) == 4 and all(t["model_uri"] for t in completed)
    old, new = completed[0], completed[1:]
    assert all((t["optim.lr"], t["model.freeze"]) != (old["optim.lr"], old["model.freeze"])
               for t in new)
    assert len({t["model.freeze"] for t in new}) >= 2  # the design spreads over the depths
    # Which settings mattered, now that there are enough trials to say.
    assert set(grown.importance.values) == {"optim.lr", "model.freeze"}
    assert "which settings mattered" in format_summary(grown, "val_acc")
    artifacts = {a.path for a in MlflowClient().list_artifacts(grown.parent_run_id)}
    assert "importance.csv" in artifacts
    plots = {a.path for a in MlflowClient().list_artifacts(grown.parent_run_id, "plots")}
    assert {"plots/importance.png", "plots/parallel_coordinates.png"} <= plots


def test_a_second_ctrl_c_stops_at_once_and_still_says_how_to_continue(monkeypatch):
    from tlray.errors import Paused
    from tlray.tune.pause import PauseOnCtrlC

    monkeypatch.setattr(sys, "argv", ["/venv/bin/tlray", "tune", "--tune.name=digits"])
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)
    asked = []  # while Tune's loop runs, SIGUSR1 asks it to stop
    with pytest.raises(Paused, match=r"^stopped at once; every trial kept its last "
                                     r"checkpoint; continue with: tlray tune "
                                     r"--tune.name=digits --resume$"):
        with PauseOnCtrlC() as pause:
            signal.signal(signal.SIGUSR1, lambda *_: asked.append(True))
            os.kill(os.getpid(), signal.SIGINT)  # the first: Tune is asked to pause
            assert pause.paused and asked == [True]
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once
            raise AssertionError("the second Ctrl-C did not stop the sweep")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)) == before
