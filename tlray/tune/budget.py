"""Sizing a sweep to a time budget (`tune.budget`): trials, epochs, ASHA, slots, the cache.

The rule. Each candidate (trials, epochs = ASHA's max_t, grace period, reduction factor) is
replayed on the slots from measured costs (tlray.tune.makespan), with ASHA's stops as Ray
makes them (tlray.tune.asha). Among those predicted to end within the budget less
`MARGIN`, the plan prefers, in order: every freeze choice tried once; a learning rate
searched too (a choice tried at a second rate, and ASHA stopping one of them), while
survivors train at least `SEARCH_EPOCHS`; every choice twice, while
survivors still train at least half the recipe's epochs; the recipe's full epochs for
survivors; more trials (Hyperband's lesson: breadth with early stopping beats a few long
trials); ASHA stopping something once there are 3 trials; then the gentlest stopping the
slack buys (a later first rung, then a smaller rf). No rung comes before a head-first
schedule has begun its last phase. A depth trains from the feature cache
when the epoch time the cache saves over the plan pays for its build. When fewer trials
than freeze choices fit, the cheapest choices are the ones tried. Trials run on every
slot (at most one a trial): the costs are measured at that concurrency, and the plan
has no costs for another.

Rejected: Ray's `time_budget_s` alone (it cuts trials off mid-run, finished or not);
Hyperband's several brackets (synchronous: it pauses trials and needs many of them);
total work divided by slots (the last trial's tail runs alone, as SweepClock learned);
ASHA's textbook 1/rf survival (Ray keeps about half of a handful of trials: tune.asha);
the recipe's epochs before a second pass over the freeze choices (one learning rate per
choice judges a depth by a lucky or unlucky rate), but not below half of them (a champion
trained for a fraction of its recipe is another recipe).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from tlray.config.interval import format_span, parse_budget, round_up_span
from tlray.errors import TlrayError
from tlray.train.progress import format_seconds
from tlray.tune import asha
from tlray.tune.makespan import (
    Costs,
    Run,
    caches_that_pay,
    makespan,
    min_epochs,
    trial_seconds,
)

__all__ = ["MARGIN", "Costs", "SweepPlan", "parse_budget", "plan_sweep"]

# The plan aims 10% under the budget: issue 29 accepts a sweep ending within budget + 10%,
# so costs measured up to 20% low (a short calibration, a busier machine) still pass.
MARGIN = 0.10
# Learning rates the design gives each freeze choice at most: 8 cut the default 2-decade
# range (1e-4..1e-2) into steps under 2x; past that a longer budget buys gentler stopping
# rather than ever more one-epoch trials.
TRIALS_PER_CHOICE = 8
# Reduction factors tried: 2, and 3 (Hyperband's eta). Ray's default 4 leaves a sweep of a
# few epochs one rung, keeping too few trials to compare freeze choices.
REDUCTION_FACTORS = (2, 3)
NO_STOPPING_RF = 2  # with grace = max_t there is no rung: the factor is never used
# The fewest epochs for which the plan gives up survivors' epochs to search the learning
# rate as well (one trial per freeze choice searches depths only): below 3, ASHA's one rung
# judges trials after a single epoch and the champion is barely trained. On the built-in
# digits in 2m this picks 4 trials of 3 epochs over 3 trials of 4.
SEARCH_EPOCHS = 3

Design = Callable[[int], Sequence[str]]  # trials -> each one's freeze choice, in start order


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep does to end within its budget, and what that is predicted to take."""

    budget_s: float
    choices: tuple[str, ...]  # the freeze choices the sweep was given
    kinds: tuple[str, ...]  # each trial's freeze choice, in the order they start
    epochs: int  # ASHA's max_t: what a trial that survives every rung trains
    grace_period: int  # = epochs when ASHA stops nothing
    reduction_factor: int
    rungs: tuple[int, ...]  # the epochs ASHA decides at (below `epochs`)
    stops: tuple[int, ...]  # each trial's expected last epoch, in start order
    slots: int  # trials that can run at once
    cached: tuple[str, ...]  # depths trained from the feature cache
    predicted_s: float
    costs: Costs
    recipe_epochs: int
    overrides: tuple[str, ...] = ()  # the user's settings that won over the plan, said

    @property
    def trials(self) -> int:
        return len(self.kinds)

    @property
    def concurrency(self) -> int:
        return max(1, min(self.slots, self.trials))

    @property
    def stopped_early(self) -> int:
        return sum(s < self.epochs for s in self.stops)

    @property
    def fits(self) -> bool:
        return self.predicted_s <= self.budget_s * (1 - MARGIN)


def plan_sweep(budget_s: float, costs: Costs, choices: Sequence[str], slots: int,
               recipe_epochs: int, *, num_samples: int | None = None,
               epochs: int | None = None, design: Design | None = None,
               strict: bool = True) -> SweepPlan:
    """The plan for a sweep that must end within `budget_s` (the module docstring's rule).

    Args:
        choices: the freeze choices (depths or schedules) the sweep searches.
        slots: trials that can run at once (`trial.concurrency`).
        recipe_epochs: the recipe's `train.epochs`: what survivors train when it fits.
        num_samples, epochs: the user's explicit `tune.num_samples` / `train.epochs`; they
            win over the plan, and the plan says so.
        design: trials -> their freeze choices in start order (the stratified design's);
            round-robin when not given.
        strict: refuse a budget under the smallest sweep (the user's own budget); else
            plan that smallest sweep, over the budget (a recipe's on a slower machine).
    Raises:
        TlrayError: strict, and the budget is under one trial of one epoch; it says what
            would fit.
    """
    choices = tuple(choices)
    ask = _Ask(budget_s, costs, choices, max(1, slots), recipe_epochs,
               design or (lambda n: [choices[i % len(choices)] for i in range(n)]))
    if strict:
        ask.check_not_too_small()
    own = ask.best()
    if num_samples is None and epochs is None:
        return own
    said = []
    if num_samples is not None:
        said.append(f"tune.num_samples={num_samples} (yours) wins over the plan's "
                    f"{own.trials} trials")
    if epochs is not None:
        said.append(f"train.epochs={epochs} (yours) wins over the plan's {own.epochs}")
    plan = ask.best(trials=num_samples, epochs=epochs)
    return replace(plan, overrides=tuple(said), recipe_epochs=epochs or recipe_epochs)


@dataclass(frozen=True)
class _Ask:
    """What a plan is asked for, and the candidates that answer it."""

    budget_s: float
    costs: Costs
    choices: tuple[str, ...]
    slots: int
    recipe_epochs: int
    design: Design

    def best(self, trials: int | None = None, epochs: int | None = None) -> SweepPlan:
        """The best plan that fits, or, when the user's settings fit none, the quickest."""
        fitting, tried = [], []
        for max_t in [epochs] if epochs else range(self.recipe_epochs, 0, -1):
            n = trials or self._most_trials(max_t)
            plans = self._plans(n, max_t) if n else []
            tried += plans
            fitting += [p for p in plans if p.fits]
        if fitting:
            return max(fitting, key=self._rank)
        return min(tried or [self.smallest()], key=lambda p: p.predicted_s)

    def _rank(self, plan: SweepPlan) -> tuple:
        """Higher is better: the module docstring's order of preference, then the
        quicker (where only the cache differs)."""
        n, covered = plan.trials, len(set(plan.kinds))
        searched = (n > len(self.choices) and plan.stopped_early > 0
                    and plan.epochs >= min(SEARCH_EPOCHS, self.recipe_epochs))
        twice = min(n, 2 * len(self.choices)) if 2 * plan.epochs >= self.recipe_epochs \
            else covered
        stops = n >= 3 and plan.stopped_early > 0
        return (covered, searched, twice, plan.epochs, n, stops, plan.grace_period,
                -plan.reduction_factor, -plan.predicted_s)

    def _most_trials(self, max_t: int) -> int:
        """The most trials some ASHA setting fits at `max_t` epochs (0: none), by bisection:
        more trials take longer."""
        low, high = 0, TRIALS_PER_CHOICE * len(self.choices)
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if any(p.fits for p in self._plans(mid, max_t)) \
                else (low, mid - 1)
        return low

    def _plans(self, trials: int, max_t: int) -> list[SweepPlan]:
        """Every ASHA setting for `trials` trials of up to `max_t` epochs."""
        kinds = self._kinds(trials, max_t)
        if kinds is None:
            return []
        # ASHA's first rung comes after every schedule's last phase has begun: at the end
        # of a head-first schedule's head phase it is a linear probe, and a rung there stops
        # it against trials that have been fine-tuning all along (seen on the digits).
        first = max(min_epochs(k) for k in kinds)
        options = [(max_t, NO_STOPPING_RF)]
        options += [(g, rf) for rf in REDUCTION_FACTORS for g in range(first, max_t)]
        return [self.candidate(kinds, max_t, g, rf) for g, rf in options]

    def _kinds(self, trials: int, max_t: int) -> tuple[str, ...] | None:
        """The trials' freeze choices: the design's, or the cheapest when not all fit."""
        valid = [c for c in self.choices if min_epochs(c) <= max_t]
        if trials >= len(self.choices):
            kinds = tuple(self.design(trials))
            return kinds if all(k in valid for k in kinds) else None
        cheapest = sorted(valid, key=lambda c: trial_seconds(c, max_t, self.costs))
        return tuple(cheapest[:trials]) if len(cheapest) >= trials else None

    def candidate(self, kinds: tuple[str, ...], max_t: int, grace: int,
                  rf: int) -> SweepPlan:
        """One plan, timed: ASHA's expected stops replayed on the slots."""
        rung_list = asha.rungs(max_t, grace, rf)
        stops = asha.stop_epochs(len(kinds), max_t, rung_list, rf)
        runs = [Run(k, s, s == max_t) for k, s in zip(kinds, stops)]
        cached = caches_that_pay(runs, self.costs)
        predicted = (self.costs.setup_s + makespan(runs, self.slots, self.costs, cached)
                     + self.costs.wrapup_s)
        return SweepPlan(self.budget_s, self.choices, kinds, max_t, grace, rf,
                         tuple(rung_list), tuple(stops), self.slots, cached, predicted,
                         self.costs, self.recipe_epochs)

    def smallest(self) -> SweepPlan:
        """One trial of the cheapest choice, as short as it can be."""
        return min((self.candidate((c,), min_epochs(c), min_epochs(c), NO_STOPPING_RF)
                    for c in self.choices), key=lambda p: p.predicted_s)

    def check_not_too_small(self) -> None:
        """Raises when not even the smallest sweep fits: the error says the smallest
        budget that does."""
        smallest = self.smallest()
        if not smallest.fits:
            (kind,), epochs = smallest.kinds, smallest.epochs
            raise too_small(self.budget_s, smallest.predicted_s,
                            f"one trial of {epochs} epoch{'s' * (epochs != 1)} at freeze "
                            f"{kind}, with the sweep's start and end,")


def budget_that_fits(predicted_s: float) -> str:
    """The smallest budget (as a user writes it) that holds a sweep of `predicted_s`, margin
    included."""
    return format_span(round_up_span(predicted_s / (1 - MARGIN)))


def too_small(budget_s: float, fits_s: float, what: str) -> TlrayError:
    """The error for a budget under the smallest sweep, with the smallest budget that fits."""
    return TlrayError(f"--tune.budget={format_span(budget_s)} is too small: {what} takes "
                      f"about {format_span(fits_s)}; the smallest budget that fits is "
                      f"--tune.budget={budget_that_fits(fits_s)}")


def plan_lines(plan: SweepPlan) -> list[str]:
    """What the sweep prints before its first trial: the plan, why, and what overrode it."""
    lines = [_summary(plan), f"plan: from measured costs: {_costs_said(plan)}"]
    lines += [f"plan: {said}" for said in plan.overrides]
    if not plan.fits:
        lines.append(f"plan: about {format_span(plan.predicted_s)} is over the "
                     f"{format_span(plan.budget_s)} budget (less its {MARGIN:.0%} margin): "
                     f"trials that cannot end in time will not start (--tune.budget="
                     f"{budget_that_fits(plan.predicted_s)} fits this plan)")
    return lines


def _summary(plan: SweepPlan) -> str:
    """`plan: 6 trials over 3 freeze choices, ... about 1m50s of a 2m budget`."""
    k, covered = len(plan.choices), len(set(plan.kinds))
    over = (f"{covered} freeze choice{'s' * (k != 1)}" if covered == k else
            f"{covered} of {k} freeze choices (the cheapest: no time for all)")
    epochs = f"{plan.epochs} epoch{'s' * (plan.epochs != 1)} each" + (
        f" (the recipe's {plan.recipe_epochs} do not fit this many trials)"
        if plan.epochs < plan.recipe_epochs else "")
    stopping = (f"rungs at {_and(plan.rungs)} epochs (ASHA keeps 1/{plan.reduction_factor})"
                if plan.rungs else "no early stopping")
    return (f"plan: {plan.trials} trial{'s' * (plan.trials != 1)} over {over}, {epochs}, "
            f"{stopping}, {plan.concurrency} at a time, about "
            f"{format_seconds(plan.predicted_s)} of a {format_span(plan.budget_s)} budget")


def _costs_said(plan: SweepPlan) -> str:
    c = plan.costs
    said = [", ".join(f"an epoch ~{_s(s)} at freeze {d}" for d, s in sorted(c.epoch_s.items())),
            f"a trial ~{_s(c.trial_s)} to start and ~{_s(c.finish_s)} to test and log",
            f"the sweep ~{_s(c.setup_s + c.wrapup_s)} to start and end"]
    if plan.rungs:
        said.append(f"ASHA expected to stop {plan.stopped_early} of {plan.trials} early")
    for depth, build in sorted(c.cache_build_s.items()):
        said.append(f"the feature cache at freeze {depth} pays for its ~{_s(build)} build "
                    f"(~{_s(c.cached_epoch_s[depth])} an epoch from it)"
                    if depth in plan.cached else
                    f"the feature cache at freeze {depth} would not pay for its "
                    f"~{_s(build)} build")
    return "; ".join(said)


def planned_vs_actual(plan: SweepPlan, actual_s: float, trials: int) -> str:
    """The sweep's last line: what it planned against what it did."""
    off = actual_s / plan.predicted_s - 1 if plan.predicted_s > 0 else 0.0
    verdict = "within" if actual_s <= plan.budget_s else "over"
    return (f"sweep: planned {plan.trials} trials in about {format_seconds(plan.predicted_s)}"
            f"; ran {trials} in {format_seconds(actual_s)} ({off:+.0%} against the plan), "
            f"{verdict} the {format_span(plan.budget_s)} budget")


def _and(numbers: Sequence[int]) -> str:
    """1, 2 and 4."""
    words = [str(n) for n in numbers]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _s(seconds: float) -> str:
    """Seconds to two figures where they are few: 0.8s, 12s."""
    return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
