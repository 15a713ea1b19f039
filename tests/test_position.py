"""When a run checkpoints inside an epoch, and what a resize does to its step counts.

The decisions are plain Python (one worker: no collective is needed); the multi-worker
agreement and the notices from Ray Train are exercised in tests/test_preemption.py.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

from tlray.config.interval import Every, parse_every
from tlray.train.checkpoint import TrainingState
from tlray.train.position import (
    DEADLINE,
    PERIODIC,
    PREEMPTION,
    MidEpochCheckpoints,
    Position,
    rescale_steps,
)


def checkpoints(every="0", check_every=5, notices=()):
    asked = iter(notices)
    return MidEpochCheckpoints(parse_every(every), check_every, lambda: next(asked, None),
                               world=1, device="cpu")


def test_every_n_steps_counts_from_the_last_checkpoint():
    c = checkpoints("4")
    due = [step for step in range(1, 14) if c.due(step) and not c.restart_clock(step)]
    assert due == [4, 8, 12]
    c.restart_clock(13)  # an epoch's end is a checkpoint too
    assert not any(c.due(step) for step in range(14, 17)) and c.due(17) == PERIODIC


def test_by_time_and_never():
    assert checkpoints("0").due(100) is None
    c = checkpoints("90s")
    assert c.due(1) is None
    c.last_time -= 91
    assert c.due(2) == PERIODIC
    assert parse_every("10m") == Every(seconds=600)


def test_a_notice_is_asked_for_at_check_steps_and_acted_on_once_then_near_the_deadline():
    soon = SimpleNamespace(deadline_ms=(time.time() + 3600) * 1000)
    c = checkpoints(check_every=5, notices=[None, soon])
    assert [c.due(s) for s in (1, 2, 3, 4, 5)] == [None] * 5  # asked at 5: nothing yet
    assert c.due(10) == PREEMPTION  # asked again at 10: the notice, a checkpoint at once
    c.restart_clock(10)
    assert c.due(15) is None  # an hour before the deadline: train on
    soon.deadline_ms = (time.time() + 0.5) * 1000  # now half a second before it
    c.wrote(0.2)  # a checkpoint takes 0.2 s to write
    c.last_time -= 1  # and the last one is a second old
    assert c.due(20) == DEADLINE
    c.restart_clock(20)
    assert c.due(25) is None  # the last one is younger than a checkpoint takes
    c.last_time -= 1
    assert c.due(30) == DEADLINE  # past the deadline, until Ray stops the workers


def test_a_resize_converts_step_counts_to_the_new_size():
    state = TrainingState(step=100, phase_start_step=40, world=2)
    assert rescale_steps(state, 1)
    assert (state.step, state.phase_start_step, state.world) == (200, 80, 1)
    assert not rescale_steps(state, 1)
    fresh = TrainingState()
    assert not rescale_steps(fresh, 4) and fresh.world == 4
    at = Position(epoch=3, steps=10, world=2, loss_sum=1.0, correct=5, seen=1280,
                  seconds=2.0, why=PREEMPTION)
    assert at.steps_to_skip(2) == 10 and at.steps_to_skip(1) == 20 and at.steps_to_skip(4) == 5
