"""ASHA's arithmetic as Ray's `ASHAScheduler` (one bracket) runs it, for planning a sweep.

Rungs sit at grace * rf^k epochs below max_t, the same as Ray's
(`ray/tune/schedulers/async_hyperband.py`, `_Bracket`), less those at or past max_t where
tlray's `epoch_asha` decides nothing. A trial reaching a rung is stopped if it is below the
(1 - 1/rf) percentile of the results *already recorded* there, and continues when none is.
So the first to arrive always goes on and, over a handful of trials, far more than the
textbook 1/rf continue: with m results recorded, the next trial continues with chance
(1 + (m-1)/rf) / (m+1) (`continue_chance`), which tends to 1/rf only for many trials. On
issue 29's sweep (6 trials, rf 3, one rung) this keeps 3 and stops 3, as ASHA did; 1/rf
would have stopped 4.
"""

from __future__ import annotations

import math


def rungs(max_t: int, grace: int, rf: int) -> list[int]:
    """The epochs at which ASHA decides: grace * rf^k below max_t."""
    out, rung = [], grace
    while rung < max_t:
        out.append(rung)
        rung *= rf
    return out


def continue_chance(recorded: int, rf: int) -> float:
    """The chance that the next trial to reach a rung continues, `recorded` results there.

    Results at a rung are taken as exchangeable: the newcomer's rank among recorded + 1 is
    uniform, and numpy's linear percentile puts the cutoff at position
    p = (1 - 1/rf)(m - 1) of the m sorted results, so the newcomer beats it with chance
    (m - p) / (m + 1). With none recorded there is no cutoff: it continues.
    """
    if recorded == 0:
        return 1.0
    m = recorded
    return (m - (1 - 1 / rf) * (m - 1)) / (m + 1)


def continuing(arrivals: int, rf: int) -> int:
    """How many of `arrivals` trials at a rung are expected to continue (nearest whole)."""
    expected = sum(continue_chance(m, rf) for m in range(arrivals))
    return math.floor(expected + 0.5)


def reaching(trials: int, rung_list: list[int], rf: int) -> list[int]:
    """How many trials reach each rung, then how many reach max_t."""
    counts = [trials]
    for _ in rung_list:
        counts.append(continuing(counts[-1], rf))
    return counts


def stop_epochs(trials: int, max_t: int, rung_list: list[int], rf: int) -> list[int]:
    """Each trial's last epoch, in the order they start.

    The first to start go furthest: they reach each rung with the fewest results to beat
    (the first of all never meets a cutoff).
    """
    counts = reaching(trials, rung_list, rf)
    ends = list(rung_list) + [max_t]
    return [ends[max(i for i, c in enumerate(counts) if j < c)] for j in range(trials)]


def expected_epochs(trials: int, max_t: int, grace: int, rf: int) -> int:
    """Epochs a sweep of `trials` trains in all, as ASHA is expected to stop them."""
    return sum(stop_epochs(trials, max_t, rungs(max_t, grace, rf), rf))
