"""The per-worker loop without Ray: a `LocalSession` over real digits, a tiny timm model.

Resume exactness, phase changes, the weight average, early stopping, the goal, preemption
checkpoints and the final test are properties of the loop itself; here each takes seconds.
Ray's side of them (a checkpoint persisted and handed back, a worker really killed) is
proven once, end to end, in test_train.py.
"""

from __future__ import annotations

import dataclasses
import json
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from tlray import config
from tlray.data.pixel_sources import builtin_mnist_arrays, from_arrays
from tlray.data.prepare import prepare
from tlray.train import checkpoint
from tlray.train.deadline import Deadline
from tlray.train.loop import run_worker
from tlray.train.protocol import WorkerArgs
from tlray.train.session import LocalSession

TINY = ["--model.backbone=test_efficientnet", "--model.weights=none", "--data.image_size=16",
        "--data.batch_size=16", "--scaling.borrow_idle_cpus=false", "--optim.lr=0.01",
        "--train.epochs=3"]
MEASURED = ("train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """300 real digits (180 to train on: 12 steps of 16 an epoch)."""
    images, labels = builtin_mnist_arrays()
    return prepare(from_arrays(images[::16][:300], labels[::16][:300]),
                   tmp_path_factory.mktemp("digits") / "ds",
                   fractions={"train": 0.6, "val": 0.2, "test": 0.2}, progress=False)


@pytest.fixture(autouse=True)
def _threads_restored():
    """A CPU worker sets torch's thread count (its CPUs): give the next test its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def args_for(info, *overrides, fault=None, goal=None, deadline=None) -> WorkerArgs:
    cfg = config.load(None, [*TINY, f"--data.dataset={info.uri}", *overrides])
    return WorkerArgs(config=cfg, dataset=info, cache=None, run_id=None, tracking_uri=None,
                      restart_key="local", fault=fault, goal=goal, deadline=deadline)


def run(args: WorkerArgs, storage: Path, **session_kwargs) -> LocalSession:
    """The loop to its end (or its fault) in this process; the session keeps its reports."""
    session = LocalSession.for_run(args, storage, **session_kwargs)
    run_worker(args, session.session())
    return session


def final(session: LocalSession, monitor: str = "val_loss"):
    with session.latest.as_directory() as d:
        return checkpoint.read_final(Path(d), monitor)


def weights(session: LocalSession) -> dict:
    return torch.load(Path(session.latest.path) / "model.pt", weights_only=True)


def epochs(session: LocalSession) -> list[dict]:
    """Every epoch's measured figures, as reported (inside-epoch checkpoints left out)."""
    return [{k: m[k] for k in MEASURED} for m, _ in session.reports
            if not m.get("partial") and not m["final"]]


def same_outcome(a, b) -> bool:
    """The same best epoch, with the same figures, and the same test results (timings aside)."""
    return ((a.best_epoch, a.best_value, a.test, a.epochs_run, a.stopped_early)
            == (b.best_epoch, b.best_value, b.test, b.epochs_run, b.stopped_early)
            and {k: getattr(a.epoch, k) for k in MEASURED}
            == {k: getattr(b.epoch, k) for k in MEASURED})


def killed_and_resumed(args: WorkerArgs, kill_at: int, tmp_path: Path):
    """The run, stopped by a fault after global step `kill_at`, then started again from its
    last checkpoint as Ray would start it: (first attempt, second attempt)."""
    first = LocalSession.for_run(args, tmp_path / "first")
    with pytest.raises(KeyError, match=f"test fault at step {kill_at}"):
        run_worker(dataclasses.replace(args, fault=f"raise:rank=0:step={kill_at}"),
                   first.session())
    second = run(args, tmp_path / "second", resume_from=first.latest)
    return first, second


# recipe -> (settings, the step of epoch 2 it dies after, the step of epoch 2 it resumes after)
RECIPES = {
    "epoch end": ([], 5, 0),
    "inside an epoch": (["--train.checkpoint_every=4"], 10, 8),
    # dropout, augmentation, a weight average, and a head-first schedule: killed in phase 2
    "phase 2, averaged, augmented": (["--model.freeze=all:1,0@0.5", "--train.ema=0.9",
                                      "--model.drop_rate=0.3", "--data.augment=digits",
                                      "--train.checkpoint_every=5"], 7, 5),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_resumed_run_trains_exactly_as_one_that_never_stopped(digits, tmp_path, recipe):
    overrides, dies_after, resumes_after = RECIPES[recipe]
    steps_per_epoch = -(-digits.splits["train"].rows // 16)
    kill_at, resumed_at = steps_per_epoch + dies_after, steps_per_epoch + resumes_after
    args = args_for(digits, *overrides)
    whole = run(args, tmp_path / "whole")
    first, second = killed_and_resumed(args, kill_at, tmp_path)

    assert epochs(first)[:1] == epochs(whole)[:1]  # the first attempt's epoch 1
    assert epochs(second) == epochs(whole)[len(epochs(first)):]  # the rest, to the digit
    state = final(second).state
    assert state.resumed == 1 and state.resumed_at == [resumed_at]
    assert [row["epoch"] for row in state.history] == [1, 2, 3]
    assert same_outcome(final(second).report, final(whole).report)
    last = weights(whole)
    assert all(torch.equal(last[k], v) for k, v in weights(second).items())


def test_a_run_resumed_from_its_final_checkpoint_only_tests_again(digits, tmp_path):
    # A trial can die after its last report (while its model is being logged); it is then
    # handed the final checkpoint back: nothing trains again, the test runs again.
    args = args_for(digits, "--train.epochs=1")
    done = run(args, tmp_path / "done")
    again = run(args, tmp_path / "again", resume_from=done.latest)
    assert [m["final"] for m, _ in again.reports] == [True]
    assert same_outcome(final(again).report, final(done).report)


def test_early_stopping_stops_a_stalled_run_and_tests_its_best_epoch(digits, tmp_path):
    # Only the head trains (every BatchNorm frozen too, so no running statistics move), at a
    # learning rate too small to change a single prediction: val_acc stalls exactly.
    args = args_for(digits, "--train.epochs=6", "--train.patience=1", "--train.monitor=val_acc",
                    "--optim.lr=1e-12", "--model.freeze=all")
    done = final(run(args, tmp_path), "val_acc")
    assert done.report.stopped_early and done.report.epochs_run == 2
    assert done.report.best_epoch == 1
    assert done.test["rows"] == digits.splits["test"].rows
    assert np.array(done.test["confusion_matrix"]).sum() == digits.splits["test"].rows


def test_a_goal_stops_a_sweep_trial_and_a_plain_run_ignores_it(digits, tmp_path):
    reached = ["--train.monitor=val_loss", "--tune.goal=100"]  # any loss is under 100
    trial = final(run(args_for(digits, *reached, goal=100.0), tmp_path / "trial"))
    assert trial.state.goal_reached and trial.report.epochs_run == 1
    plain = final(run(args_for(digits, *reached), tmp_path / "plain"))
    assert not plain.state.goal_reached and plain.report.epochs_run == 3


def test_a_budgeted_trial_stops_before_an_epoch_that_would_end_too_late_and_is_tested(
        digits, tmp_path):
    # A deadline 1,000 s away. The plan says an epoch of the whole network takes 10,000 s:
    # a schedule's head-only epoch 1 is followed by no epoch 2, and its best is tested.
    planned = {"all": 1.0, "0": 10_000.0}
    schedule = args_for(digits, "--model.freeze=all:1,0",
                        deadline=Deadline(time.time() + 1000, planned))
    stopped = final(run(schedule, tmp_path / "schedule"))
    assert stopped.report.stopped_early and stopped.report.epochs_run == 1
    assert stopped.test["rows"] == digits.splits["test"].rows
    # What a trial measured itself wins over the plan: the same deadline lets a run that
    # trains the whole network from epoch 1 on train all 3 (each took about a second).
    timed = final(run(args_for(digits, "--model.freeze=0",
                               deadline=Deadline(time.time() + 1000, planned)),
                      tmp_path / "timed"))
    assert not timed.report.stopped_early and timed.report.epochs_run == 3


def test_a_preemption_notice_checkpoints_at_once_and_the_run_resumes_there(digits, tmp_path):
    # Ray Train answers the notice checks (every 3 steps here); the third check, after
    # global step 9, hears of a drain: a checkpoint is written right then.
    checks = []
    notice = types.SimpleNamespace(preempted_node_ids=["node-b"], preempted_ranks=[0],
                                   deadline_ms=None)

    def preemption_notice():
        checks.append(None)
        return notice if len(checks) >= 3 else None

    args = args_for(digits, "--scaling.notice_check_every=3", "--train.epochs=2")
    drained = LocalSession.for_run(args, tmp_path / "drained",
                                   preemption_notice=preemption_notice)
    with pytest.raises(KeyError):  # the node goes at step 11
        run_worker(dataclasses.replace(args, fault="raise:rank=0:step=11"), drained.session())
    partial = [m for m, _ in drained.reports if m.get("partial")]
    assert [m["step"] for m in partial] == [9]
    with drained.latest.as_directory() as d:
        state = json.loads((Path(d) / "state.json").read_text())
    assert state["preemptions"] == 1 and state["position"]["why"] == "preemption"
    assert state["position"]["steps"] == 9 and state["position"]["epoch"] == 1

    whole = run(args, tmp_path / "whole")
    resumed = run(args, tmp_path / "resumed", resume_from=drained.latest)
    assert final(resumed).state.resumed_at == [9]
    assert epochs(resumed) == epochs(whole)


def test_a_first_phase_from_the_feature_cache_trains_as_it_would_from_images(digits, tmp_path):
    from tlray.train.plan import check_model, plan_feature_cache

    args = args_for(digits, "--model.freeze=all:1,0@0.5", "--train.epochs=2",
                    "--train.feature_cache=always", f"--storage_path={tmp_path / 'store'}")
    model, minfo = check_model(args.config, digits)
    cache, why = plan_feature_cache(args.config, digits, model, minfo, in_this_process=True)
    assert cache is not None and cache.splits == ("train", "val"), why
    cached = run(dataclasses.replace(args, cache=cache), tmp_path / "cached")
    plain = run(args, tmp_path / "plain")
    first, second = epochs(cached)
    # Phase 1 trains the head on the cached front's outputs: the same numbers as on images.
    # Phase 2 trains the whole model on images in both, from head weights equal but for
    # float rounding (the cache was computed in batches of another size).
    assert first == epochs(plain)[0]
    # AUC ranks scores: rounding can swap two near-tied ones, and each swap moves it by a
    # step (1 / (positives x negatives) of one class, over the classes), not by a fraction.
    rows, classes = digits.splits["val"].rows, len(digits.classes)
    auc_step = 1 / ((rows // classes) * (rows - rows // classes)) / classes
    assert second["val_auc"] == pytest.approx(epochs(plain)[1]["val_auc"], abs=5 * auc_step)
    assert ({k: v for k, v in second.items() if k != "val_auc"} ==
            pytest.approx({k: v for k, v in epochs(plain)[1].items() if k != "val_auc"},
                          rel=1e-3))
    one_image = 1 / digits.splits["test"].rows
    assert abs(final(cached).report.test.acc - final(plain).report.test.acc) <= one_image


def test_augmented_training_with_a_cache_for_validation_only_equals_no_cache(digits, tmp_path):
    from tlray.train.plan import check_model, plan_feature_cache

    args = args_for(digits, "--model.freeze=all", "--train.epochs=1", "--data.augment=digits",
                    "--train.feature_cache=always", f"--storage_path={tmp_path / 'store'}")
    model, minfo = check_model(args.config, digits)
    cache, why = plan_feature_cache(args.config, digits, model, minfo, in_this_process=True)
    assert cache.splits == ("val",), why
    cached = run(dataclasses.replace(args, cache=cache), tmp_path / "cached")
    plain = run(args, tmp_path / "plain")
    # Training went through the whole model on augmented images both times; validation
    # from the cached front equals the whole model's on the (never augmented) images.
    (with_cache,), (without,) = epochs(cached), epochs(plain)
    assert {k: with_cache[k] for k in ("train_loss", "train_acc", "val_acc", "lr")} == \
        {k: without[k] for k in ("train_loss", "train_acc", "val_acc", "lr")}
    assert with_cache["val_loss"] == pytest.approx(without["val_loss"], abs=1e-5)
    assert final(cached).report.test == final(plain).report.test


def test_past_a_preemption_deadline_checkpoints_keep_coming_until_the_node_goes(digits,
                                                                                tmp_path):
    # The notice's deadline has passed when it arrives (Ray restarts the run a little after
    # it): besides the checkpoint at the notice, more follow, each once the last is older
    # than a checkpoint takes to write, so a restart loses only the last few steps.
    checks = []

    def preemption_notice():
        checks.append(None)
        return types.SimpleNamespace(preempted_node_ids=["node-b"], preempted_ranks=[0],
                                     deadline_ms=int(time.time() * 1000)) \
            if len(checks) >= 2 else None

    args = args_for(digits, "--scaling.notice_check_every=1", "--train.epochs=2")
    session = run(args, tmp_path, preemption_notice=preemption_notice)
    why = []
    for metrics, found in session.reports:
        if metrics.get("partial"):
            with found.as_directory() as d:
                why.append(json.loads((Path(d) / "state.json").read_text())["position"]["why"])
    assert why[0] == "preemption" and "preemption deadline" in why[1:], why
    assert set(why) == {"preemption", "preemption deadline"}
    assert len(checks) == 2  # Ray is asked until it tells of the drain, then not again
