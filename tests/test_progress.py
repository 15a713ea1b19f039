"""Progress a person can follow on long epochs and long sweeps (a given clock, no waiting)."""

from __future__ import annotations

import re

from tlray.train.progress import PROGRESS_LINES, EpochTicker, format_seconds
from tlray.tune.clock import SweepClock


def _run(ticks, total=20_000, say=True):
    lines, now = [], [0.0]
    ticker = EpochTicker(2, 5, total, lines.append if say else None, 0.0,
                         clock=lambda: now[0])
    for done, at in ticks:
        now[0] = at
        ticker.tick(done)
    return lines


def test_a_long_epoch_says_how_far_it_is_every_15_s_after_the_first_20():
    lines = _run([(1_000, 5.0), (4_000, 19.9), (5_000, 20.0), (6_000, 30.0), (8_000, 35.1),
                  (9_000, 40.0), (20_000, 80.0)])
    assert lines == ["epoch 2/5  5,000/20,000 images  250 img/s  ETA 1m00s",
                     "epoch 2/5  8,000/20,000 images  228 img/s  ETA 53s",
                     "epoch 2/5  20,000/20,000 images  250 img/s  ETA 0s"]
    # Labelled as a sweep labels them, Ray's log dedup must keep them apart.
    assert all(re.match(PROGRESS_LINES, f"trial-0f87f_00001: {line}") for line in lines)


def test_a_short_epoch_and_other_ranks_say_nothing():
    assert _run([(10_000, 10.0), (20_000, 19.0)]) == []
    assert _run([(5_000, 25.0), (20_000, 60.0)], say=False) == []


def test_durations_read_as_a_person_reads_them():
    assert [format_seconds(s) for s in (0.4, 59.6, 61, 3599, 3600, 7322, float("inf"))] == [
        "0s", "1m00s", "1m01s", "59m59s", "1h00m", "2h02m", "?"]


def _clock(**kwargs):
    now = [0.0]
    return SweepClock(clock=lambda: now[0], **kwargs), now


def test_the_sweep_estimates_each_trial_at_its_own_kinds_epoch_time():
    # Two at a time; the design plans freeze 3, 3, 0, 0; depth 0 epochs cost more.
    clock, _ = _clock(trials=4, epochs=5, concurrency=2, kinds=["3", "3", "0", "0"])
    assert clock.observe("a", "3", 1, 10.0, started=["a"]) is None  # b has not started
    assert clock.observe("a", "3", 2, 10.0, started=["a", "b"]) is None  # b has no epoch
    line = clock.observe("b", "3", 1, 10.0, started=["a", "b"])
    # a has 3 epochs left at 10 s, b 4; c and d (depth 0, not seen yet: the mean, 10 s)
    # take the slots a and b free, at 30 s and 40 s: the last ends at 40 + 50 s.
    assert line == ("sweep: about 1m30s left (17 trial epochs to go; an epoch takes ~10 s at "
                    "freeze 3; 2 at a time; ASHA may stop some trials early)")
    assert clock.observe("a", "3", 3, 10.0, started=["a", "b"]) is None  # said once
    # a ends (ASHA stopped it); c starts, at depth 0, and shows what depth 0 costs.
    clock.trial_ended("a", started=["a", "b", "c"])
    clock.observe("c", "0", 1, 40.0, started=["a", "b", "c"])
    line = clock.trial_ended("b", started=["a", "b", "c"])
    # c: 4 epochs at 40 s in one slot; d (depth 0, still to come): 5 at 40 s in the other.
    assert line.startswith("sweep: about 3m20s left (9 trial epochs to go; an epoch takes "
                           "~40 s at freeze 0, ~10 s at freeze 3;")


def test_a_schedules_later_phases_are_estimated_at_their_own_depth():
    # Head first for one epoch (fast), then everything (slow): the first epoch's time says
    # nothing about the rest, so the clock waits for a phase-2 epoch before it speaks.
    clock, _ = _clock(trials=2, epochs=5, concurrency=2, kinds=["all:1,0", "all:1,0"])
    assert clock.observe("a", "all:1,0", 1, 4.0, started=["a", "b"]) is None
    assert clock.observe("b", "all:1,0", 1, 4.0, started=["a", "b"]) is None  # depth 0 untimed
    line = clock.observe("a", "all:1,0", 2, 12.0, started=["a", "b"])
    # a: 3 epochs at depth 0 (12 s); b: 4 at 12 s, side by side: b ends last, after 48 s.
    assert line == ("sweep: about 48s left (7 trial epochs to go; an epoch takes ~12 s at "
                    "freeze 0, ~4 s at freeze all; 2 at a time; ASHA may stop some trials "
                    "early)")


def test_an_epoch_in_flight_counts_only_what_is_left_of_it():
    # The 20k stand-in's sweep: two trials side by side, 55 s epochs. When b completes,
    # a is 50 s into its last epoch; the time left is the rest of it, not half an epoch.
    clock, now = _clock(trials=2, epochs=2, concurrency=2)
    clock.observe("a", "0", 1, 55.0, started=["a", "b"])
    now[0] = 3.0
    assert clock.observe("b", "0", 1, 55.0, started=["a", "b"]).startswith(
        "sweep: about 55s left (2 trial epochs to go;")  # b, 3 s behind a, ends last
    now[0] = 50.0
    clock.observe("b", "0", 2, 55.0, started=["a", "b"])
    assert clock.trial_ended("b", started=["a", "b"]).startswith(
        "sweep: about 5s left (1 trial epoch to go;")
    assert clock._time_left(["a"], 0) == 5.0
    now[0] = 70.0  # slower than the mean: nothing left to subtract, not a negative time
    assert clock._time_left(["a"], 0) == 0.0
    clock.observe("a", "0", 2, 70.0, started=["a", "b"])
    assert clock.trial_ended("a", started=["a", "b"]) is None  # nothing left to say
