"""Sweep benchmark: one sweep, timed end to end under two values of one setting.

By default the setting is the frozen-backbone feature cache (`train.feature_cache=auto`
against `never`); `--compare tune.trials_per_gpu=4,1` times GPU sharing instead (several
small-input trials on one GPU against one trial per GPU), and any other `section.key=A,B`
works the same way. The first value is the candidate, the second the baseline.

Both sides run the same sweep (same config, same search seed, so the same trials are
sampled) on the same Ray cluster, each with fresh storage, so that a feature cache is paid
for inside its side's timed wall time. ASHA is told to stop nothing (`tune.grace_period` =
`train.epochs` + 2, past a trial's last report): it decides from the order in which results
arrive, which differs between two runs, and would otherwise stop different trials on each
side; `--set tune.grace_period=N` times the sweep with early stopping instead. The
candidate runs first, so warm-up (imports, page cache, Ray's worker pool) counts against it,
not for it. Reported per side: wall time, trials (completed / stopped by ASHA), the best
trial's validation metric and test accuracy, and the mean seconds of a trial and of its
epochs per freeze depth; then the ratios baseline/candidate for the whole sweep and per
freeze depth.

`--regret` asks another question: how good is the sweep's pick? It runs the sweep once as
configured (ASHA stopping trials as it would), trains every config ASHA stopped to the full
budget, and prints the pick, the best fully-trained config, the regret (the validation
metric and test accuracy the pick leaves on the table) and the wall time of both phases.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from tlray import config as config_mod
from tlray.config import recipes
from tlray.errors import TlrayError
from tlray.track.metrics import best_of

DEFAULT_COMPARE = "train.feature_cache=auto,never"


@dataclass
class SweepSide:
    value: str  # the compared setting's value on this side
    wall_s: float
    trials: int
    completed: int
    best_metric: float | None
    best_test_acc: float | None
    best_config: dict
    seconds_by_freeze: dict[str, float]  # mean trial seconds per freeze depth
    epoch_seconds_by_freeze: dict[str, float]  # mean seconds of its epochs (train + val)
    epoch_seconds_by_phase: dict[str, float] = field(default_factory=dict)  # schedules only


@dataclass
class SweepBenchResult:
    monitor: str
    setting: str  # the compared `section.key`
    sides: dict[str, SweepSide] = field(default_factory=dict)  # candidate first, then baseline

    @property
    def candidate(self) -> SweepSide:
        return list(self.sides.values())[0]

    @property
    def baseline(self) -> SweepSide:
        return list(self.sides.values())[1]

    @property
    def ratio(self) -> float:
        """How many times faster the whole sweep ran with the candidate value."""
        return self.baseline.wall_s / self.candidate.wall_s

    @property
    def epochs_ratio_by_phase(self) -> dict[str, float]:
        """A schedule's epoch time per phase (the frozen phase is where a cache helps)."""
        return _ratios(self.baseline.epoch_seconds_by_phase,
                       self.candidate.epoch_seconds_by_phase)

    @property
    def ratio_by_freeze(self) -> dict[str, float]:
        """Trial wall time, baseline / candidate, per freeze depth."""
        return _ratios(self.baseline.seconds_by_freeze, self.candidate.seconds_by_freeze)

    @property
    def epochs_ratio_by_freeze(self) -> dict[str, float]:
        """Time in epochs (what a cache changes; start-up is the same on both sides)."""
        return _ratios(self.baseline.epoch_seconds_by_freeze,
                       self.candidate.epoch_seconds_by_freeze)


def _ratios(plain: dict, cached: dict) -> dict[str, float]:
    return {d: plain[d] / cached[d] for d in plain if cached.get(d)}


def parse_compare(spec: str) -> tuple[str, list[str]]:
    """`section.key=A,B` -> (key, [A, B]), both values checked against the config; `A;B`
    when a value holds a comma (a freeze schedule: `model.freeze=all:1,0@0.5;0`)."""
    key, sep, values = spec.partition("=")
    sides = [v.strip() for v in values.split(";" if ";" in values else ",")]
    if not sep or len(sides) != 2 or not all(sides) or sides[0] == sides[1]:
        raise TlrayError(f"--compare {spec!r}: expected SECTION.KEY=CANDIDATE,BASELINE, "
                         f"two different values (e.g. {DEFAULT_COMPARE})")
    for value in sides:
        config_mod.load(None, [f"{key.strip()}={value}"])  # unknown key or bad value: fails
    return key.strip(), sides


def sweep_benchmark(overrides: list[str] | None = None, config_path: str | None = None,
                    workdir: str | None = None, compare: str = DEFAULT_COMPARE
                    ) -> SweepBenchResult:
    """Runs the sweep (default: the `mnist` recipe on the built-in digits) twice,
    once per value of `compare` (`section.key=CANDIDATE,BASELINE`)."""
    from tlray.data.prepare import resolve_dataset
    from tlray.tune import sweep

    key, values = parse_compare(compare)
    # The sides run the trials they are given: no budget plan, which would size each anew.
    base = config_mod.load(config_path or recipes.path("mnist"),
                           ["tune.budget=none", *(overrides or [])])
    _check_the_sides_differ(base, key, values)
    if not any("tune.grace_period" in o for o in overrides or []):
        base = config_mod.load(None, [f"tune.grace_period={base.train.epochs + 2}"], base=base)
    resolve_dataset(base.data.dataset)  # prepared once, outside both timings
    workdir = workdir or tempfile.mkdtemp(prefix="tlray-bench-sweep-")
    result = SweepBenchResult(monitor=base.train.monitor, setting=key)
    for value in values:
        tag = re.sub(r"[^\w.-]+", "_", value)  # a directory and a model name
        cfg = config_mod.load(None, [f"{key}={value}",
                                     f"storage_path={workdir}/{tag}",
                                     "tracking.experiment=tlray-benchmark-sweep",
                                     f"tune.registered_name=tlray-benchmark-sweep-{tag}",
                                     f"tune.name=bench-{tag}"], base=base)
        started = time.perf_counter()
        outcome = sweep.sweep(cfg)
        wall = time.perf_counter() - started
        by_freeze, epochs_by_freeze = defaultdict(list), defaultdict(list)
        for t in outcome.trials:
            if t.get("seconds") is not None:
                by_freeze[str(t["model.freeze"])].append(t["seconds"])
            if t.get("epochs_seconds") is not None:
                epochs_by_freeze[str(t["model.freeze"])].append(t["epochs_seconds"])
        result.sides[value] = SweepSide(
            value=value, wall_s=wall, trials=len(outcome.trials),
            completed=sum(t["status"] == "COMPLETED" for t in outcome.trials),
            best_metric=outcome.best_metrics.get(f"best_{cfg.train.monitor}"),
            best_test_acc=outcome.best_metrics.get("test_acc"), best_config=outcome.best_config,
            seconds_by_freeze=_means(by_freeze), epoch_seconds_by_freeze=_means(epochs_by_freeze),
            epoch_seconds_by_phase=_phase_epoch_seconds(outcome.trials))
    return result


def _check_the_sides_differ(base, key: str, values: list[str]) -> None:
    """Refuses the cache comparison where both sides would train the same way: with
    augmented training images `auto` builds no cache (one for validation alone does not
    pay), so auto and never would time one thing twice."""
    from tlray.config.augmentation import AUTO, from_config

    if (key == "train.feature_cache" and sorted(values) == ["auto", "never"]
            and (base.data.augment == AUTO or from_config(base.data).enabled)):
        raise TlrayError(f"--compare {key}=auto,never times nothing: training images are "
                         f"augmented (data.augment={base.data.augment}), which a cache "
                         f"never serves; add --set data.augment=none, or compare "
                         f"{key}=always,never to time a validation-only cache")


def _phase_epoch_seconds(trials: list[dict]) -> dict[str, float]:
    """Mean epoch seconds per phase of every schedule's trials, from their MLflow metric
    histories (`phase` and `epoch_seconds` per epoch), keyed `SCHEDULE phase N`."""
    from mlflow.tracking import MlflowClient

    from tlray.config.schedule import parse

    client, seconds = MlflowClient(), defaultdict(list)
    for t in trials:
        freeze = str(t["model.freeze"])
        if len(parse(freeze)) < 2 or not t.get("mlflow_run_id"):
            continue
        phase = {m.step: int(m.value) for m in client.get_metric_history(t["mlflow_run_id"],
                                                                         "phase")}
        for m in client.get_metric_history(t["mlflow_run_id"], "epoch_seconds"):
            if m.step in phase:
                seconds[f"{freeze} phase {phase[m.step] + 1}"].append(m.value)
    return _means(seconds)


@dataclass
class RegretResult:
    """A sweep's pick against what its trials would have reached with the whole budget."""

    monitor: str
    pick: dict  # the sweep's winner: searched values, val metric, test_acc
    best: dict  # the best config by val metric once every trial has had all its epochs
    trials: list[dict]  # every config: searched values, status in the sweep, val, test_acc
    sweep_s: float
    full_s: float  # training the stopped trials' configs to the full budget

    @property
    def regret(self) -> float:
        """The val metric the pick leaves on the table (>= 0; in the monitor's direction)."""
        return abs(self.best[self.monitor] - self.pick[self.monitor])

    @property
    def test_regret(self) -> float:
        """test_acc of the best fully-trained config minus the pick's (may be negative)."""
        return self.best["test_acc"] - self.pick["test_acc"]


def regret_benchmark(overrides: list[str] | None = None, config_path: str | None = None,
                     workdir: str | None = None) -> RegretResult:
    """Runs the sweep as configured (ASHA as it is), then trains every config it stopped
    early to the full `train.epochs`, with nothing stopped, and compares.

    Trials the sweep ran to the end keep their results (a seeded one-worker run repeats
    exactly), so only the stopped ones are trained again.
    """
    from tlray.data.prepare import resolve_dataset
    from tlray.tune import sweep

    # The sides run the trials they are given: no budget plan, which would size each anew.
    base = config_mod.load(config_path or recipes.path("mnist"),
                           ["tune.budget=none", *(overrides or [])])
    resolve_dataset(base.data.dataset)
    workdir = workdir or tempfile.mkdtemp(prefix="tlray-bench-regret-")
    common = ["tracking.experiment=tlray-benchmark-regret", f"storage_path={workdir}"]
    started = time.perf_counter()
    picked = sweep.sweep(config_mod.load(None, [*common, "tune.name=regret-sweep",
                                                "tune.registered_name=tlray-regret-sweep"],
                                         base=base))
    sweep_s = time.perf_counter() - started
    monitor, mode = base.train.monitor, base.monitor_mode
    searched = list(picked.best_config)
    rows = [{**{k: t[k] for k in searched}, "status": t["status"], monitor: t[monitor],
             "test_acc": t["test_acc"]} for t in picked.trials]
    stopped = [{k: r[k] for k in searched} for r in rows if r["status"] != "COMPLETED"]
    started = time.perf_counter()
    if stopped:
        full = sweep.sweep(config_mod.load(None, [
            *common, "tune.name=regret-full", "tune.registered_name=tlray-regret-full",
            f"tune.grace_period={base.train.epochs + 2}"], base=base), points=stopped)
        finished = {_key(t, searched): t for t in full.trials}
        for r in rows:
            if r["status"] != "COMPLETED":
                t = finished[_key(r, searched)]
                r.update({monitor: t[monitor], "test_acc": t["test_acc"],
                          "status": f"{r['status']}, then trained to the end"})
    full_s = time.perf_counter() - started
    pick = next(r for r in rows if _key(r, searched) == _key(picked.best_config, searched))
    best = best_of(rows, lambda r: r[monitor], mode)
    return RegretResult(monitor=monitor, pick=pick, best=best, trials=rows,
                        sweep_s=sweep_s, full_s=full_s)


def _key(row: dict, keys: list[str]) -> tuple:
    return tuple(round(row[k], 12) if isinstance(row[k], float) else str(row[k]) for k in keys)


def format_regret(result: RegretResult) -> str:
    m = result.monitor
    lines = [f"{'config':<44} {m:>9} {'test acc':>9}  in the sweep"]
    for r in result.trials:
        name = ", ".join(f"{k.rpartition('.')[2]}={_num(v) if isinstance(v, float) else v}"
                         for k, v in r.items() if k not in (m, "test_acc", "status"))
        mark = " <- pick" if r is result.pick else ""
        mark += " <- best fully trained" if r is result.best else ""
        lines.append(f"{name:<44} {_num(r[m]):>9} {_num(r['test_acc']):>9}  "
                     f"{r['status']}{mark}")
    lines.append(f"regret of the sweep's pick: {m} {result.regret:.4f}, test acc "
                 f"{result.test_regret:+.4f}; sweep {result.sweep_s:.1f} s, training the "
                 f"stopped configs to the end {result.full_s:.1f} s")
    return "\n".join(lines)


def _means(values: dict[str, list[float]]) -> dict[str, float]:
    return {d: sum(v) / len(v) for d, v in sorted(values.items())}


def format_sweep(result: SweepBenchResult) -> str:
    depths = sorted({d for s in result.sides.values() for d in s.seconds_by_freeze})
    label = result.setting.rpartition(".")[2]
    lines = [f"{label:<16} {'wall s':>7} {'trials':>7} {'done':>5} "
             f"{'best ' + result.monitor:>13} {'test acc':>9}  mean trial s (epochs s) by "
             f"freeze depth"]
    for value, s in result.sides.items():
        per = "  ".join(f"{d}: {s.seconds_by_freeze[d]:.1f} "
                        f"({s.epoch_seconds_by_freeze.get(d, float('nan')):.1f})"
                        if d in s.seconds_by_freeze else f"{d}: -" for d in depths)
        lines.append(f"{value:<16} {s.wall_s:>7.1f} {s.trials:>7} {s.completed:>5} "
                     f"{_num(s.best_metric):>13} {_num(s.best_test_acc):>9}  {per}")
    per_ratio = "  ".join(f"{d}: {r:.2f}x" for d, r in result.ratio_by_freeze.items())
    epoch_ratio = "  ".join(f"{d}: {r:.2f}x" for d, r in result.epochs_ratio_by_freeze.items())
    lines.append(f"speed-up of {result.setting}={result.candidate.value} over "
                 f"{result.baseline.value}: whole sweep {result.ratio:.2f}x; trials by freeze "
                 f"depth {per_ratio}; their epochs {epoch_ratio}")
    if result.epochs_ratio_by_phase:
        for value, s in result.sides.items():
            lines.append(f"{value:<16} epoch s by schedule phase: " + "  ".join(
                f"{k}: {v:.1f}" for k, v in s.epoch_seconds_by_phase.items()))
        lines.append("  epochs by schedule phase: " + "  ".join(
            f"{k}: {r:.2f}x" for k, r in result.epochs_ratio_by_phase.items()))
    return "\n".join(lines)


def sweep_json(result: SweepBenchResult) -> str:
    return json.dumps({"monitor": result.monitor, "setting": result.setting,
                       "candidate": result.candidate.value, "baseline": result.baseline.value,
                       "ratio": result.ratio, "ratio_by_freeze": result.ratio_by_freeze,
                       "epochs_ratio_by_freeze": result.epochs_ratio_by_freeze,
                       "epochs_ratio_by_phase": result.epochs_ratio_by_phase,
                       "sides": {v: asdict(s) for v, s in result.sides.items()}}, indent=2)


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}"
