"""A sweep sized to a time budget: parsing it, ASHA's arithmetic as Ray runs it, the sweep's
time on its slots, the plan and its sentences, and its revision as trials end.

Pure arithmetic on injected costs: no Ray, no training, no clock.
"""

from __future__ import annotations

import numpy as np
import pytest

from tlray import config
from tlray.config.interval import Every, format_span, parse_budget, parse_every
from tlray.errors import TlrayError
from tlray.tune import asha
from tlray.tune.clock import SweepClock
from tlray.tune.makespan import Costs, Run, caches_that_pay, makespan

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


def test_sweep_clock_still_reads_a_schedules_depth_per_epoch():
    clock = SweepClock(trials=1, epochs=4, concurrency=1)
    assert [clock.depth("all:2,0@0.5", e) for e in (1, 2, 3, 4)] == ["all", "all", "0", "0"]
