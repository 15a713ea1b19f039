"""Which searched settings mattered: fANOVA importances from the sweep's trials, via Optuna.

The trials' results become an Optuna study (one finished trial per Tune trial that reported
an epoch, its value the best `train.monitor` it reached, its parameters the searched values
with the distributions they were drawn from), and Optuna's fANOVA evaluator (a seeded random
forest, then the variance each parameter explains) says how much each setting decided the
result. fANOVA rather than PED-ANOVA: PED-ANOVA compares the top quantile of trials with the
rest, and a sweep of 4-16 trials has one or two trials in any top quantile; fANOVA uses every
trial. Trials ASHA stopped early count with the best value they reached, which favours the
settings that learn fast; below `MIN_TRIALS` nothing is said at all.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

MIN_TRIALS = 4


@dataclass
class Importance:
    """Settings, most important first, with their share of the explained variance."""

    values: dict[str, float]
    trials: int
    note: str = ""

    def table(self) -> str:
        width = max(len(k) for k in self.values)
        return "\n".join(f"  {k:<{width}}  {v:.2f}" for k, v in self.values.items())


def importance(trials: list[dict], distributions: dict, metric: str, mode: str):
    """(Importance or None, an Optuna study or None, a note). `trials` are the sweep's rows
    (searched values and `metric`), `distributions` Optuna distributions by setting."""
    import optuna

    usable = [t for t in trials if isinstance(t.get(metric), (int, float))
              and math.isfinite(t[metric]) and all(k in t for k in distributions)]
    if len(usable) < MIN_TRIALS:
        return None, None, (f"too few trials ({len(usable)} with a result) to say which "
                            f"settings mattered; {MIN_TRIALS} or more are needed (add some "
                            f"with --resume --more N)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for t in usable:
        params = {k: _param(t[k], d) for k, d in distributions.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                  value=float(t[metric])))
    varied = {k: d for k, d in distributions.items()
              if len({str(t[k]) for t in usable}) > 1}
    if not varied:
        return None, study, "every trial had the same settings: nothing to compare"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            params=list(varied))
    note = (f"fANOVA on {len(usable)} trials' best {metric}; with fewer than ~10 trials, "
            f"read it as a hint") if len(usable) < 10 else ""
    return Importance(dict(values), len(usable), note), study, note


def distributions(cfg, choices: list[str]) -> dict:
    """Optuna distributions of the searched settings, as the sweep's space draws them."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    t = cfg.tune
    out = {}
    if t.lr_min < t.lr_max:
        out["optim.lr"] = FloatDistribution(t.lr_min, t.lr_max, log=True)
    if len(choices) > 1:
        out["model.freeze"] = CategoricalDistribution(choices)
    for key, spec in (t.space or {}).items():
        if isinstance(spec, list):
            out[key] = CategoricalDistribution(spec)
            continue
        (kind, (low, high)), = spec.items()
        out[key] = (IntDistribution(low, high - 1) if kind == "randint" else
                    FloatDistribution(low, high, log=kind == "loguniform"))
    return out


def plots(study, names: list[str]):
    """The importance bars and the parallel coordinates of every trial, as figures."""
    import optuna
    import optuna.visualization.matplotlib as vis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        bars = vis.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            params=names).figure
        lines = vis.plot_parallel_coordinate(study).figure
    return bars, lines


def _param(value, distribution):
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return value if value in distribution.choices else str(value)
    return int(value) if isinstance(distribution, IntDistribution) else float(value)
