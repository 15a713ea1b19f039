"""A sweep sized to a time budget: parsing it, ASHA's arithmetic as Ray runs it, the sweep's
time on its slots, the plan and its sentences, and its revision as trials end.

Pure arithmetic on injected costs: no Ray, no training, no clock.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from tlray import config
from tlray.config.interval import Every, format_span, parse_budget, parse_every
from tlray.errors import TlrayError
from tlray.tune import asha
from tlray.tune.budget import MARGIN, plan_lines, plan_sweep, planned_vs_actual
from tlray.tune.clock import SweepClock
from tlray.tune.makespan import Costs, Run, caches_that_pay, makespan
from tlray.tune.replan import Running, can_start, trials_to_add

# Three freeze choices as the main job searches them; a frozen epoch costs less.
CHOICES = ["0", "3", "all:2,0@0.5"]
COSTS = Costs(epoch_s={"0": 16.0, "3": 9.0, "all": 5.0}, trial_s=8.0, finish_s=6.0,
              setup_s=6.0, wrapup_s=4.0)


# --- parsing -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("2m", 120), ("20m", 1200), ("1h30m", 5400), ("4h", 14400), ("90", 90),
    (90, 90), ("1m30s", 90), ("10 min", 600), (" 2M ", 120)])
def test_a_budget_is_read_in_the_forms_people_write(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", [None, "", "none"])
def test_no_budget(text):
    assert parse_budget(text) is None


@pytest.mark.parametrize("text", ["soon", "0", "0s", "-5", "2x", "h", "30m1h", "1h 30"])
def test_a_bad_budget_names_the_option_and_the_forms(text):
    with pytest.raises(TlrayError, match=r"--tune\.budget: expected .*90s.*1h30m.*4h"):
        parse_budget(text)


def test_a_bad_budget_fails_when_the_config_is_resolved_before_ray_starts():
    with pytest.raises(TlrayError, match=r"--tune\.budget"):
        config.load(None, ["--tune.budget=soon"])
    assert config.load(None, ["--tune.budget=1h30m"]).tune.budget == "1h30m"
    assert config.load(None, ["--tune.budget=90"]).tune.budget == "90"  # YAML read an int


def test_checkpoint_every_shares_the_span_parser():
    assert parse_every("10m") == Every(seconds=600)
    assert parse_every("1h") == Every(seconds=3600)
    assert parse_every("200") == Every(steps=200)
    with pytest.raises(TlrayError, match="whole number"):
        parse_every("2.5")


@pytest.mark.parametrize("seconds, text", [(120, "2m"), (5400, "1h30m"), (90, "1m30s"),
                                           (50, "50s")])
def test_spans_are_written_in_the_form_they_are_read(seconds, text):
    assert format_span(seconds) == text and parse_budget(text) == seconds


# --- ASHA's arithmetic ----------------------------------------------------------------------

def test_rungs_are_grace_times_rf_powers_below_max_t():
    assert asha.rungs(9, 1, 3) == [1, 3]  # and the end at 9 (the digest: 1, 3, 9)
    assert asha.rungs(100, 1, 4) == [1, 4, 16, 64]
    assert asha.rungs(6, 1, 2) == [1, 2, 4]
    assert asha.rungs(6, 6, 2) == []  # grace = max_t: ASHA stops nothing


def test_continue_chance_by_hand():
    assert asha.continue_chance(0, 3) == 1  # nothing recorded: no cutoff
    assert asha.continue_chance(1, 3) == pytest.approx(1 / 2)  # beat the one result
    assert asha.continue_chance(2, 3) == pytest.approx(4 / 9)  # (2 - 2/3) / 3


def test_continue_chance_matches_rays_cutoff_rule_on_random_results():
    """Ray stops a trial below np.nanpercentile(recorded, (1 - 1/rf) * 100) of the results
    recorded before it; replayed on 20,000 random orders of 6 trials, rf 3."""
    scores = np.random.default_rng(0).uniform(size=(20_000, 6))
    kept = np.ones(len(scores))  # the first always continues
    for m in range(1, 6):
        cutoff = np.percentile(scores[:, :m], (1 - 1 / 3) * 100, axis=1)
        kept += scores[:, m] >= cutoff
    expected = sum(asha.continue_chance(m, 3) for m in range(6))
    assert kept.mean() == pytest.approx(expected, rel=0.02)


def test_issue_29s_six_trial_sweep_stops_three_as_asha_did():
    """6 trials, grace 2, rf 3, 6 epochs: about 3.15 continue (1 + 1/2 + 4/9 + 5/12 + 2/5
    + 7/18); 1/rf would say 2."""
    assert asha.stop_epochs(6, 6, asha.rungs(6, 2, 3), 3) == [6, 6, 6, 2, 2, 2]


def test_expected_epochs_by_hand_and_the_digests_large_sweep_limit():
    # 9 trials, 9/1/3: 4.28 of 9 pass rung 1 -> 4; 2.36 of 4 pass rung 3 -> 2;
    # 5 stop at 1, 2 at 3, 2 train 9: 5 + 6 + 18.
    assert asha.expected_epochs(9, 9, 1, 3) == 29
    # Many trials keep 1/rf at each rung: the digest's 2.33 epochs a trial.
    assert asha.expected_epochs(9000, 9, 1, 3) / 9000 == pytest.approx(7 / 3, rel=0.01)


# --- the sweep's time on its slots ----------------------------------------------------------

HAND = Costs(epoch_s={"0": 10.0, "all": 2.0}, trial_s=1.0, finish_s=3.0,
             cache_build_s={"all": 5.0}, cached_epoch_s={"all": 0.5})
HAND_RUNS = [Run("0", 2, True), Run("all", 1, False), Run("all", 3, True),
             Run("all:1,0", 2, True)]


def test_makespan_by_hand():
    """Slot 1: "0" 1+20+3 = 24. Slot 2: "all" stopped 1+2 = 3, then "all" 3..13, then the
    schedule 13+1+2 (head) +10 (all unfrozen) +3 = 29. Work/slots would say 26.5."""
    assert makespan(HAND_RUNS, 2, HAND) == 29
    assert makespan(HAND_RUNS, 1, HAND) == 24 + 3 + 10 + 16


def test_makespan_with_a_cache_its_first_trial_builds():
    """The stopped "all" trial builds it 1..6, trains 0.5; the next "all" 6.5+1+1.5+3 = 12;
    the schedule's head epoch reads it: 12+1+0.5+10+3 = 26.5."""
    assert makespan(HAND_RUNS, 2, HAND, cached=["all"]) == 26.5
    # Two trials at a cached depth that start together: the second waits for the build.
    assert makespan([Run("all", 1, False)] * 2, 2, HAND, cached=["all"]) == 6.5


def test_the_cache_is_used_where_its_build_pays_for_itself():
    runs = [Run("all", 4, True)]  # 4 epochs save 6 s against a 5 s build
    assert caches_that_pay(runs, HAND) == ("all",)
    assert caches_that_pay([Run("all", 2, True)], HAND) == ()  # 3 s saved: no
    assert caches_that_pay([Run("all:1,0", 6, True)], HAND) == ()  # only its head epoch


# --- the plan -------------------------------------------------------------------------------

def predicted_again(plan) -> float:
    runs = [Run(k, s, s == plan.epochs) for k, s in zip(plan.kinds, plan.stops)]
    return (plan.costs.setup_s + makespan(runs, plan.slots, plan.costs, plan.cached)
            + plan.costs.wrapup_s)


def test_a_plan_fits_its_budget_and_grows_with_it():
    plans = [plan_sweep(b, COSTS, CHOICES, 2, 6) for b in (90, 120, 180, 300, 600)]
    for plan in plans:
        assert plan.predicted_s <= plan.budget_s * (1 - MARGIN) and plan.fits
        assert plan.predicted_s == pytest.approx(predicted_again(plan))
        assert plan.epochs <= 6 and plan.concurrency == 2
    trials = [p.trials for p in plans]
    assert trials == sorted(trials) and trials[-1] > trials[0]
    assert plans[-1].epochs == 6  # a long budget: the recipe's epochs for survivors


def test_every_freeze_choice_is_tried_and_twice_when_affordable():
    small, large = (plan_sweep(b, COSTS, CHOICES, 2, 6) for b in (120, 240))
    assert set(small.kinds) == set(CHOICES)
    assert all(large.kinds.count(c) >= 2 for c in CHOICES)
    assert 2 * large.epochs >= 6  # survivors train at least half the recipe's epochs


def test_a_second_pass_over_the_choices_comes_before_the_recipes_epochs():
    """200 s buy 6 trials of 4 epochs; the recipe's 6 epochs would leave fewer trials."""
    plan = plan_sweep(200, COSTS, CHOICES, 2, 6)
    at_six = plan_sweep(200, COSTS, CHOICES, 2, 6, epochs=6)
    assert (plan.trials, plan.epochs) == (6, 4) and at_six.trials < plan.trials


def test_a_learning_rate_is_searched_too_before_survivors_train_longer():
    """The main job's costs on seed 7 (7 December 2026): 3 trials of 4 epochs fit in 2m, and
    so do 4 of 3. Three trials give each freeze choice one learning rate: the depth is
    searched, the rate not. The plan takes the fourth trial, with ASHA stopping one."""
    costs = Costs(epoch_s={"0": 18.0, "3": 15.0, "all": 4.5}, trial_s=3.7, finish_s=6.4,
                  setup_s=15.0, wrapup_s=8.0)
    depths = ["0", "3", "all"]
    plan = plan_sweep(120, costs, depths, 2, 8)
    assert plan_sweep(120, costs, depths, 2, 8, num_samples=3, epochs=4).fits
    assert (plan.trials, plan.epochs) == (4, 3) and plan.stopped_early >= 1
    assert set(plan.kinds) == set(depths)
    # Not at any price: survivors of a single epoch and a rung after one are no search.
    short = plan_sweep(95, costs, depths, 2, 8)
    assert short.trials == 3 and short.epochs >= 2


def test_but_not_below_half_the_recipes_epochs():
    """10 s epochs, one slot, 63 s to spend: 4 trials fit at 2 epochs (2+2+1+1) but not at
    3 (3+3+1+1); 2 trials of 3 epochs do, and 3 epochs is half the recipe's 6."""
    costs = Costs(epoch_s={"0": 10.0, "3": 10.0})
    plan = plan_sweep(70, costs, ["0", "3"], 1, 6)
    assert (plan.trials, plan.epochs, plan.predicted_s) == (2, 3, 60)


def test_a_long_budget_buys_gentler_stopping_not_none():
    """At the cap of trials, with time to train every trial to the end, ASHA still stops
    some, at the latest rung that does."""
    plan = plan_sweep(3600, COSTS, CHOICES, 2, 6)
    every_one = [Run(k, plan.epochs, True) for k in plan.kinds]
    assert COSTS.setup_s + makespan(every_one, 2, COSTS) + COSTS.wrapup_s < 0.9 * 3600
    assert plan.stopped_early > 0 and plan.rungs == (5,)


def test_asha_stops_something_once_there_are_three_trials():
    plan = plan_sweep(180, COSTS, CHOICES, 2, 6)
    assert plan.trials >= 3 and plan.rungs and plan.stopped_early > 0
    assert plan.stops == tuple(asha.stop_epochs(plan.trials, plan.epochs, list(plan.rungs),
                                                plan.reduction_factor))


@pytest.mark.parametrize("budget_s", [120, 180, 600, 3600])
def test_no_rung_judges_a_head_first_schedule_before_its_last_phase(budget_s):
    """all:2,0@0.5 trains its head alone for 2 epochs: a rung at 1 or 2 would compare a
    linear probe with trials fine-tuning from the start."""
    plan = plan_sweep(budget_s, COSTS, CHOICES, 2, 6)
    assert plan.rungs and min(plan.rungs) >= 3, plan
    if budget_s == 180:  # tight: depths alone are judged sooner
        assert min(plan_sweep(budget_s, COSTS, ["0", "3", "all"], 2, 6).rungs) < 3


def test_when_not_every_choice_fits_the_cheapest_are_tried():
    plan = plan_sweep(60, COSTS, CHOICES, 2, 6)
    assert plan.trials < len(CHOICES) and "0" not in plan.kinds  # freeze 0 costs most
    assert "2 of 3 freeze choices (the cheapest" in plan_lines(plan)[0]


def test_the_plan_line_says_what_and_why():
    plan = plan_sweep(240, COSTS, CHOICES, 2, 6)
    summary, why = plan_lines(plan)
    assert re.fullmatch(r"plan: \d+ trials over 3 freeze choices, 6 epochs each, rungs at "
                        r"[\d, and]+ epochs \(ASHA keeps 1/[23]\), 2 at a time, about "
                        r"\dm\d\ds of a 4m budget", summary), summary
    assert "an epoch ~16s at freeze 0" in why and "ASHA expected to stop" in why


def test_an_explicit_num_samples_or_epochs_wins_and_the_plan_says_so():
    own = plan_sweep(120, COSTS, CHOICES, 2, 6)
    plan = plan_sweep(120, COSTS, CHOICES, 2, 6, num_samples=own.trials + 3)
    assert plan.trials == own.trials + 3
    assert (f"plan: tune.num_samples={own.trials + 3} (yours) wins over the plan's "
            f"{own.trials} trials") in plan_lines(plan)
    plan = plan_sweep(120, COSTS, CHOICES, 2, 6, epochs=3)
    assert plan.epochs == 3 and any("train.epochs=3 (yours)" in x for x in plan_lines(plan))


def test_explicit_settings_over_the_budget_are_kept_and_said():
    plan = plan_sweep(120, COSTS, CHOICES, 2, 6, num_samples=12, epochs=6)
    assert (plan.trials, plan.epochs) == (12, 6) and not plan.fits
    assert "trials that cannot end in time will not start" in plan_lines(plan)[-1]


def test_a_budget_too_small_says_the_smallest_that_fits():
    """The cheapest trial: freeze 3, one epoch: 6 + 8 + 9 + 6 + 4 = 33 s; with the 10%
    margin 36.7 s, rounded up to 40 s."""
    with pytest.raises(TlrayError, match=r"--tune\.budget=36s is too small: one trial of 1 "
                                         r"epoch at freeze 3.*33s.*--tune\.budget=40s$"):
        plan_sweep(36, COSTS, ["0", "3"], 2, 6)
    assert plan_sweep(40, COSTS, ["0", "3"], 2, 6).kinds == ("3",)


def test_a_recipes_budget_too_small_for_this_machine_runs_the_smallest_sweep_and_says_so():
    plan = plan_sweep(36, COSTS, ["0", "3"], 2, 6, strict=False)
    assert (plan.kinds, plan.epochs, plan.predicted_s, plan.fits) == (("3",), 1, 33, False)
    assert plan_lines(plan)[-1] == ("plan: about 33s is over the 36s budget (less its 10% "
                                    "margin): trials that cannot end in time will not start "
                                    "(--tune.budget=40s fits this plan)")


def test_the_cache_is_chosen_only_when_its_build_pays_within_the_budget():
    """Trained from the cache, an epoch at freeze 3 saves 5 s; its build costs 40 s. 150 s
    buys 7 epochs at freeze 3 (35 s saved: no cache), 200 s buys 10 (50 s: the cache)."""
    costs = Costs(epoch_s={"0": 10.0, "3": 6.0}, trial_s=2.0, finish_s=2.0,
                  cache_build_s={"3": 40.0}, cached_epoch_s={"3": 1.0})
    short, long = (plan_sweep(b, costs, ["0", "3"], 1, 6) for b in (150, 200))
    assert short.cached == () and "would not pay for its ~40s build" in plan_lines(short)[1]
    assert long.cached == ("3",) and "pays for its ~40s build" in plan_lines(long)[1]


def test_planned_vs_actual():
    plan = plan_sweep(120, COSTS, CHOICES, 2, 6)
    line = planned_vs_actual(plan, plan.predicted_s * 1.1, plan.trials + 1)
    assert re.fullmatch(rf"sweep: planned {plan.trials} trials in about \dm\d\ds; ran "
                        rf"{plan.trials + 1} in \dm\d\ds \(\+10% against the plan\), "
                        r"within the 2m budget", line), line


# --- revising the plan as trials end ---------------------------------------------------------

ONE = Costs(epoch_s={"0": 10.0})


def two_trials():
    """2 trials of 2 epochs at 20 s each, one at a time, a 100 s budget (90 s aimed at)."""
    plan = plan_sweep(100, ONE, ["0"], 1, 2, num_samples=2, epochs=2)
    assert (plan.kinds, plan.stops, plan.predicted_s) == (("0", "0"), (2, 2), 40)
    return plan


def test_ahead_of_plan_trials_are_added_that_still_end_in_time():
    plan = two_trials()
    # The first trial ended at 20 s; the second ends at 40, two more at 60 and 80.
    assert trials_to_add(plan, ONE, 20, [], started=1) == 2
    # Epochs measured at 4 s: the second ends at 28, then 7 more of 8 s before 90.
    faster = ONE.with_measured({"0": 4.0})
    assert trials_to_add(plan, faster, 20, [], started=1, new_kinds=["0"] * 10) == 7
    assert trials_to_add(plan, faster, 20, [], started=1) == 6  # the cap: 8 per choice
    # The first trial 4 s into its second epoch at 15 s: it ends at 21, the second at 41.
    running = [Running("0", epochs_done=1, into_epoch_s=4)]
    assert trials_to_add(plan, ONE, 15, running, started=1) == 2


def test_behind_plan_no_trial_starts_that_cannot_end_in_time():
    plan = two_trials()
    assert trials_to_add(plan, ONE.with_measured({"0": 30.0}), 20, [], started=1) == 0
    assert can_start(plan, ONE, 80, "0")  # ends at 100: the budget
    assert not can_start(plan, ONE, 81, "0")
    assert not can_start(plan, ONE.with_measured({"0": 15.0}), 71, "0")


def test_behind_plan_a_trial_starts_that_reaches_ashas_first_rung_in_time():
    from tlray.tune.makespan import trial_seconds

    plan = plan_sweep(120, ONE, ["0"], 2, 4, num_samples=4, epochs=4)
    assert plan.rungs and plan.grace_period < plan.epochs, plan
    to_rung = trial_seconds("0", plan.grace_period, ONE) + ONE.wrapup_s
    late = plan.budget_s - to_rung
    # It trains to its rung and is tested in time (its deadline stops it there), though
    # every epoch would not fit.
    assert can_start(plan, ONE, late, "0")
    assert late + trial_seconds("0", plan.epochs, ONE) + ONE.wrapup_s > plan.budget_s
    assert not can_start(plan, ONE, late + 1, "0")


def test_sweep_clock_still_reads_a_schedules_depth_per_epoch():
    clock = SweepClock(trials=1, epochs=4, concurrency=1)
    assert [clock.depth("all:2,0@0.5", e) for e in (1, 2, 3, 4)] == ["all", "all", "0", "0"]


# --- a started trial's deadline -----------------------------------------------------------

def test_a_trial_must_end_its_training_before_the_budget_less_its_test_and_the_sweeps_end():
    from tlray.tune.budgeted import trial_deadline

    plan = plan_sweep(120, COSTS, CHOICES, 2, 6)
    deadline = trial_deadline(plan, started_at=1000.0, fixed=frozenset())
    assert deadline.ends_at == 1000.0 + 120 - COSTS.finish_s - COSTS.wrapup_s
    assert deadline.epoch_s == COSTS.epoch_s
    assert trial_deadline(None, 1000.0, frozenset()) is None  # no budget
    # Epochs the user gave win over the budget, as they win over the plan.
    assert trial_deadline(plan, 1000.0, frozenset({"train.epochs"})) is None


def test_the_next_epoch_is_timed_by_the_trials_own_epochs_at_its_depth_else_by_the_plan():
    from tlray.train.deadline import Deadline

    deadline = Deadline(ends_at=100.0, epoch_s={"all": 5.0, "0": 16.0})
    head = [{"epoch": 1, "epoch_seconds": 4.0}]
    # A schedule's epoch 2 trains everything: not timed yet, so the plan's 16 s count.
    assert deadline.next_epoch_fits("all:1,0", head, now=84.0)
    assert not deadline.next_epoch_fits("all:1,0", head, now=84.5)
    # Once timed at its depth, the trial's own latest epoch counts (slower than planned).
    both = head + [{"epoch": 2, "epoch_seconds": 30.0}]
    assert not deadline.next_epoch_fits("all:1,0", both, now=71.0)
    assert deadline.next_epoch_fits("all:1,0", both, now=70.0)


def test_a_trial_that_stopped_itself_does_not_say_it_trained_all_its_epochs():
    from tlray.tune.pick import COMPLETED, trial_description

    trial = {"model.freeze": "3", "optim.lr": 0.005, "status": COMPLETED, "epochs": 2,
             "val_loss": 0.05, "test_acc": 0.99}
    assert "trained all 2 epochs" in trial_description(trial, "val_loss", False)
    stopped = trial_description({**trial, "stopped_early": True}, "val_loss", True)
    assert stopped.startswith("freeze `3`, lr 0.005: stopped itself after epoch 2, best")
    assert stopped.endswith("; the sweep's pick")
