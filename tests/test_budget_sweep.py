"""A sweep sized to its time budget: the guard's decisions without Ray, then a real sweep on
a real local Ray cluster and SQLite store that plans, says its plan and runs it."""

from __future__ import annotations

import pickle
import re
import time
import types

import pytest
from mlflow import MlflowClient

from tlray import config
from tlray.errors import TlrayError
from tlray.train.plan import preflight
from tlray.tune import sweep
from tlray.tune.budget import plan_lines, plan_sweep
from tlray.tune.budget_guard import BudgetGuard, GuardedSearch, GuardedVariants
from tlray.tune.budgeted import plan_to_budget, trials_in_time_left
from tlray.tune.calibrate import calibrate
from tlray.tune.makespan import Costs
from tlray.tune.space import freeze_choices

COSTS = Costs(epoch_s={"0": 10.0, "all": 4.0}, trial_s=3.0, finish_s=5.0, setup_s=10.0,
              wrapup_s=5.0)


def trial(kind: str, trial_id: str = "t1"):
    return types.SimpleNamespace(trial_id=trial_id, config={"model.freeze": kind})


def guard_at(elapsed_s: float, budget_s: float = 120.0) -> BudgetGuard:
    """A guard `elapsed_s` into a sweep of 2 trials of 3 epochs, which ASHA never stops: a
    trial must have time for all 3."""
    plan = plan_sweep(budget_s, COSTS, ["0", "all"], slots=2, recipe_epochs=3, num_samples=2)
    assert plan.grace_period == plan.epochs == 3
    return BudgetGuard(plan, started_at=time.time() - elapsed_s)


def test_a_trial_that_could_not_end_in_time_does_not_start_and_the_sweep_ends(capsys):
    guard = guard_at(elapsed_s=100.0)  # 20 s left: a trial at freeze 0 takes 3+30+5 s
    assert guard.may_start(trial("all", "first"))  # the first always starts
    assert guard.may_start(trial("all", "first"))  # and is asked again with the same answer
    assert not guard.may_start(trial("0"))
    assert "does not start" in capsys.readouterr().out
    assert guard.refused == {"t1"} and not guard.may_start(trial("0"))  # stays refused
    guard._trials = [types.SimpleNamespace(status="RUNNING")]
    assert not guard.stop_all()  # the running one ends first
    guard._trials = [types.SimpleNamespace(status="TERMINATED")]
    assert guard.stop_all()
    # Restored with a paused sweep, which resumes without a budget, it refuses nothing.
    restored = pickle.loads(pickle.dumps(guard))
    assert restored.may_start(trial("0", "t2")) and not restored.stop_all()


def test_a_refused_trial_is_never_handed_to_tune_and_gives_its_slot_back(capsys):
    # Tune starts every trial its search algorithm creates as soon as a slot is free (its
    # scheduler only orders them): a trial without time must not be created at all.
    from ray import tune
    from ray.tune.experiment import Experiment

    guard = guard_at(elapsed_s=90.0)  # 30 s left: freeze all (3+12+5+5 s) fits, 0 does not
    search = GuardedVariants(guard, max_concurrent=1, points_to_evaluate=[
        {"model.freeze": "all"}, {"model.freeze": "0"}, {"model.freeze": "all"}])
    search.add_configurations([Experiment("budgeted", lambda config: None, num_samples=3,
                                          config={"model.freeze": tune.choice(["0", "all"])})])
    first = search.next_trial()
    assert first.config["model.freeze"] == "all" and search.next_trial() is None  # one at once
    search.on_trial_complete(first.trial_id)
    assert search.next_trial() is None  # freeze 0: refused, so never a Tune trial
    assert "does not start" in capsys.readouterr().out
    third = search.next_trial()  # its slot was given back at once
    assert third.config["model.freeze"] == "all"
    (refused,) = guard.not_started()
    assert refused.config == {"model.freeze": "0"} and not refused.metrics
    assert guard.refused == {refused.trial_id} != {first.trial_id, third.trial_id}
    # A sweep that ends before its search created every planned trial lists the rest too,
    # in the design's order, after the refused ones.
    planned = [{"model.freeze": k} for k in ("all", "0", "all", "0", "all")]
    rows = guard.not_started(planned)
    assert [(r.trial_id == refused.trial_id, r.config["model.freeze"]) for r in rows] == [
        (True, "0"), (False, "0"), (False, "all")]
    assert not rows[1].metrics and len({r.trial_id for r in rows}) == 3


def test_optunas_search_asks_the_guard_too():
    from ray import tune
    from ray.tune.experiment import Experiment
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    guard = guard_at(elapsed_s=110.0)  # 10 s left: no trial after the first fits
    space = {"model.freeze": tune.choice(["0", "all"]), "optim.lr": tune.loguniform(1e-3, 1e-2)}
    search = GuardedSearch(guard, ConcurrencyLimiter(
        OptunaSearch(metric="val_loss", mode="min", seed=1), max_concurrent=1))
    search.set_search_properties("val_loss", "min", space)
    search.add_configurations([Experiment("budgeted", lambda config: None, config=space,
                                          num_samples=3)])
    first = search.next_trial()
    search.on_trial_complete(first.trial_id, result={"val_loss": 1.0})
    assert search.next_trial() is None and len(guard.refused) == 1
    assert search.next_trial() is None and len(guard.refused) == 2  # its slot came back


def test_measured_epochs_replace_the_calibrations(capsys):
    guard = guard_at(elapsed_s=80.0)  # 40 s left
    guard.started.add("first")
    assert not guard.may_start(trial("0", "a"))  # 3 + 3 x 10 + 5 + wrap-up 5 > 40
    result = {"epoch": 1, "epoch_seconds": 5.0, "final": False}
    guard.on_trial_result(1, [], trial("0", "b"), result)
    assert guard.costs().epoch_s["0"] == 5.0
    assert guard.may_start(trial("0", "c"))  # 3 + 15 + 5 + 5 <= 40


def test_ahead_of_plan_the_design_continues_with_what_still_fits():
    cfg = config.load(None, ["--tune.freeze=0,all", "--tune.lr_min=1e-3",
                             "--tune.lr_max=1e-2"])
    done = [{"optim.lr": 2e-3, "model.freeze": "0"}, {"optim.lr": 5e-3, "model.freeze": "all"}]
    early = trials_in_time_left(guard_at(elapsed_s=30.0, budget_s=300.0), cfg, ["0", "all"],
                                done)
    late = trials_in_time_left(guard_at(elapsed_s=250.0, budget_s=300.0), cfg, ["0", "all"],
                               done)
    assert len(early) > len(late) >= 0 and early
    assert {t["model.freeze"] for t in early} == {"0", "all"}
    assert all((t["optim.lr"], t["model.freeze"]) not in
               {(d["optim.lr"], d["model.freeze"]) for d in done} for t in early)


SMALL = ["--model.backbone=test_efficientnet", "--model.weights=none", "--data.image_size=32",
         "--scaling.num_workers=1", "--scaling.cpus_per_worker=0.5", "--train.epochs=3",
         "--train.monitor=val_acc", "--tune.freeze=0,all", "--tune.lr_min=1e-3",
         "--tune.lr_max=1e-2", "--tune.registered_name=budgeted",
         "--tracking.evaluate=never", "--scaling.borrow_idle_cpus=false"]


@pytest.mark.parametrize("settings, cached", [
    (["--data.augment=none"], {"all"}),  # freeze 1's front outputs more than it takes in
    (["--data.augment=digits"], set()),  # augmented images never train from a cache
    (["--data.augment=none", "--train.feature_cache=never"], set()),
], ids=["plain images", "augmented", "cache never"])
def test_calibration_times_the_feature_cache_where_trials_would_train_from_it(
        ray_cluster, few_digits, settings, cached):
    cfg = config.load(None, SMALL[:4] + [f"--data.dataset={few_digits.uri}",
                                         "--tune.freeze=0;1;all", *settings])
    plan = preflight(cfg, plan_cache=False)
    costs = calibrate(plan, freeze_choices(plan.config, plan.model.group_names), time.time())
    assert set(costs.epoch_s) == {"0", "1", "all"}
    assert set(costs.cache_build_s) == set(costs.cached_epoch_s) == cached
    assert all(s > 0 for s in [*costs.cache_build_s.values(), *costs.cached_epoch_s.values()])
    # What the plan is given: with a cache to weigh, it says whether its build pays.
    said = " ".join(plan_lines(plan_sweep(120.0, costs, ["0", "1", "all"], slots=1,
                                          recipe_epochs=3)))
    assert ("feature cache at freeze all" in said) == bool(cached)


@pytest.mark.ray
def test_a_budgeted_sweep_says_its_plan_and_runs_it(ray_cluster, few_digits, capsys):
    cfg = config.load(None, SMALL + [f"--data.dataset={few_digits.uri}", "--tune.budget=20s"])
    result = sweep.sweep(cfg)
    out = capsys.readouterr().out
    plan = re.search(r"^plan: (\d+) trials? over .*?, (\d+) epochs? each", out, re.M)
    assert plan, out[-3000:]
    planned, epochs = int(plan[1]), int(plan[2])
    ran = [t for t in result.trials if not t["status"].startswith("NOT STARTED")]
    added = re.search(r"^sweep: ahead of plan: (\d+) more trial", out, re.M)
    assert len(result.trials) == planned + (int(added[1]) if added else 0)
    assert all(t["epochs"] <= epochs for t in ran)
    # A completed trial trained the plan's epochs, or stopped itself where one more would
    # have ended past the budget (its epochs slower than calibrated: a loaded machine).
    completed = [t for t in ran if t["status"] == "COMPLETED"]
    assert completed and all(t["epochs"] == epochs or t["stopped_early"] for t in completed)
    assert re.search(r"^sweep: planned \d+ trials in about \S+; ran \d+ in \S+ \([+-]\d+% "
                     r"against the plan\), (within|over) the 20s budget$", out, re.M)
    params = MlflowClient().get_run(result.parent_run_id).data.params
    assert params["tune.num_samples"] == str(planned) and params["train.epochs"] == str(epochs)
    # Each trial read the feature cache exactly where the plan said it pays for its build.
    pays = re.search(r"feature cache at freeze all pays for", out) is not None
    for t in ran:
        cache = MlflowClient().get_run(t["mlflow_run_id"]).data.tags["feature_cache"]
        assert cache.startswith("not used") != (pays and t["model.freeze"] == "all"), cache


def test_an_explicit_trial_count_wins_over_the_plan(ray_cluster, few_digits, capsys):
    """Decided and said before any trial: the sweep then runs the plan's count and epochs
    (test_a_budgeted_sweep_says_its_plan_and_runs_it)."""
    cfg = config.load(None, SMALL + [f"--data.dataset={few_digits.uri}", "--tune.budget=90s",
                                     "--tune.num_samples=1", "--train.epochs=1"])
    fixed = frozenset({"tune.num_samples", "train.epochs"})
    planned, _, budget_plan = plan_to_budget(preflight(cfg, plan_cache=False), ["0", "all"],
                                             fixed, time.time())
    out = capsys.readouterr().out
    assert "tune.num_samples=1 (yours) wins over the plan's" in out
    assert "train.epochs=1 (yours) wins over the plan's" in out
    assert (budget_plan.trials, budget_plan.epochs) == (1, 1)
    assert (planned.config.tune.num_samples, planned.config.train.epochs) == (1, 1)


def test_a_trials_start_and_end_are_measured_and_replace_the_estimates():
    now = [0.0]
    plan = plan_sweep(300.0, COSTS, ["0", "all"], slots=2, recipe_epochs=3)
    guard = BudgetGuard(plan, started_at=0.0, clock=lambda: now[0])
    one = types.SimpleNamespace(trial_id="a", config={"model.freeze": "0"},
                                last_result={"final": True})
    guard.on_trial_start(1, [], one)
    now[0] = 15.0  # its first epoch took 10 s of these 15: 5 s to start
    guard.on_trial_result(1, [], one, {"epoch": 1, "epoch_seconds": 10.0, "final": False})
    now[0] = 30.0
    guard.on_trial_result(2, [], one, {"epoch": 2, "epoch_seconds": 12.0, "final": False})
    now[0] = 39.0  # tested and logged 9 s after its last epoch
    guard.on_trial_complete(3, [], one)
    costs = guard.costs()
    assert (costs.trial_s, costs.finish_s) == (5.0, 9.0)
    assert costs.epoch_s["0"] == 11.0 and costs.epoch_s["all"] == COSTS.epoch_s["all"]


def test_a_budget_too_small_is_refused_when_the_user_gave_it_and_planned_when_a_recipe_did(
        ray_cluster, mnist, capsys):
    """Planned from costs measured on this machine: 5 s cannot hold even a sweep's start."""
    cfg = config.load(None, SMALL + [f"--data.dataset={mnist.uri}", "--tune.budget=5s"])
    plan = preflight(cfg, plan_cache=False)
    with pytest.raises(TlrayError, match=r"--tune\.budget=5s is too small: .* the smallest "
                                         r"budget that fits is --tune\.budget="):
        plan_to_budget(plan, ["0", "all"], frozenset({"tune.budget"}), time.time())
    _, kept, smallest = plan_to_budget(plan, ["0", "all"], frozenset(), time.time())
    assert (smallest.trials, smallest.epochs, smallest.fits) == (1, 1, False)
    assert kept == ["all"]  # the cheaper choice
    assert re.search(r"^plan: about \S+ is over the 5s budget .* \(--tune\.budget=\S+ fits "
                     r"this plan\)$", capsys.readouterr().out, re.M)
