"""What a sweep searches: learning rate x freeze depth (and any `tune.space` field), as Tune's
param_space, and the stratified design that covers both axes evenly."""

from __future__ import annotations

import json
import math

from tlray import config as config_mod
from tlray.config import Config, schedule
from tlray.errors import TlrayError


def freeze_choices(cfg: Config, group_names: tuple[str, ...]) -> list[str]:
    """The freeze depths (or schedules) to try: every depth from 0 to "all", or the user's
    list, each checked against the backbone's groups and the epochs."""
    n = len(group_names)
    if cfg.tune.freeze.strip() == "auto":
        return [str(k) for k in range(n)] + ["all"]
    choices = schedule.choices(cfg.tune.freeze)
    for c in choices:
        for phase in schedule.parse(c, cfg.train.epochs, key="tune.freeze"):
            if phase.depth != "all" and int(phase.depth) > n:
                raise TlrayError(f"--tune.freeze: {c!r} is not a freeze depth of "
                                 f"{cfg.model.backbone} (0..{n} or 'all'; groups: "
                                 f"{', '.join(group_names)})")
    if not choices:
        raise TlrayError("--tune.freeze: empty list of freeze depths")
    return choices


def search_space(cfg: Config, choices: list[str]) -> dict:
    """Tune's param_space: flat `section.key` names, so the trial table reads like the config.

    Args:
        choices: the freeze depths to try, from `freeze_choices`.
    """
    from ray import tune

    space = {"optim.lr": tune.loguniform(cfg.tune.lr_min, cfg.tune.lr_max)
             if cfg.tune.lr_min < cfg.tune.lr_max else cfg.tune.lr_min,
             "model.freeze": tune.choice(choices)}
    for key, spec in (cfg.tune.space or {}).items():
        config_mod.load(None, [f"{key}={_example(spec)}"], base=cfg)  # the key must exist
        space[key] = _distribution(key, spec)
    return space


def spread_trials(cfg: Config, choices: list[str]) -> list[dict]:
    """`tune.num_samples` (learning rate, freeze depth) pairs that cover both axes evenly.

    A Latin hypercube: the log learning-rate range is cut into as many equal strata as there
    are trials and one rate is drawn in each; the freeze depths are taken at equal steps
    along `choices` from a random start (every depth, when there are at least as many trials
    as depths); the two are paired at random. A handful of purely random draws easily lands
    in one corner: seeded, the MNIST sweep's four drew every learning rate from the upper
    half of its range, two of them at the same depth and within 20% of each other.

    They start in rounds, each depth once per round in the order of `choices`: every depth
    reaches ASHA's first rung early, and a depth's second trial is judged against every
    depth's first. (Drawn in random order, a digits sweep started its two head-only trials
    first; ASHA, with nothing else to compare them with, let both train to the end, and
    the budget was spent before the others got past their rung.)
    """
    import numpy as np

    t = cfg.tune
    n, k = t.num_samples, len(choices)
    rng = np.random.default_rng(t.seed)
    start = rng.uniform()
    depths = [choices[min(k - 1, math.floor((i + start) * k / n))] for i in range(n)]
    edges = np.linspace(math.log(t.lr_min), math.log(t.lr_max), n + 1)
    lrs = np.clip(np.exp(rng.uniform(edges[:-1], edges[1:])), t.lr_min, t.lr_max)
    rng.shuffle(lrs)
    return [{"optim.lr": float(lr), "model.freeze": d}
            for lr, d in zip(lrs, in_rounds(depths, choices))]


def in_rounds(depths: list[str], choices: list[str]) -> list[str]:
    """`depths` reordered in rounds: each depth's first, in the order of `choices`, then
    each one's second, and so on."""
    taken: dict[str, int] = {}
    keyed = []  # (round, place in choices, depth)
    for depth in depths:
        keyed.append((taken.get(depth, 0), choices.index(depth), depth))
        taken[depth] = taken.get(depth, 0) + 1
    return [depth for *_, depth in sorted(keyed)]


def _example(spec):
    if isinstance(spec, list):
        if not spec:
            raise TlrayError("--tune.space: an empty list of choices")
        return json.dumps(spec[0])
    if isinstance(spec, dict) and len(spec) == 1:
        (_, bounds), = spec.items()
        return json.dumps(bounds[0]) if isinstance(bounds, list) and bounds else "null"
    return json.dumps(spec)


def _distribution(key: str, spec):
    from ray import tune

    if isinstance(spec, list):
        return tune.choice(spec)
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, bounds), = spec.items()
        makers = {"loguniform": tune.loguniform, "uniform": tune.uniform,
                  "randint": tune.randint}
        if kind in makers and isinstance(bounds, list) and len(bounds) == 2:
            return makers[kind](*bounds)
    raise TlrayError(f"--tune.space {key}: expected a list of choices or one of "
                     f"{{loguniform|uniform|randint: [low, high]}}, got {spec!r}")



def more_trials(cfg: Config, choices: list[str], done: list[dict], n: int) -> list[dict]:
    """`n` more (learning rate, freeze depth) pairs that continue a sweep's design.

    The log learning-rate range is cut into as many slices as there will be trials, and the
    new rates are drawn in slices none of the `done` trials' rates fell in; the new depths
    are those covered least so far (on a tie, the next in `choices` after the last one
    taken, so that a batch spreads over the depths). Paired at random, seeded
    by `tune.seed` and the size of the sweep, so growing the same sweep again draws anew.
    """
    import numpy as np

    t = cfg.tune
    total = len(done) + n
    rng = np.random.default_rng(None if t.seed is None else [t.seed, total])
    edges = np.linspace(math.log(t.lr_min), math.log(t.lr_max), total + 1)
    taken = {min(total - 1, int(np.searchsorted(edges, math.log(d["optim.lr"]), "right")) - 1)
             for d in done if "optim.lr" in d}
    free = [i for i in range(total) if i not in taken]
    slices = sorted(rng.choice(free, size=n, replace=False))
    lrs = np.clip(np.exp(rng.uniform(edges[slices], edges[np.array(slices) + 1])),
                  t.lr_min, t.lr_max)
    counts = {c: sum(str(d.get("model.freeze")) == c for d in done) for c in choices}
    depths, after = [], -1
    for _ in range(n):
        order = choices[after + 1:] + choices[:after + 1]
        depth = min(order, key=lambda c: counts[c])  # stable: the first least covered
        counts[depth] += 1
        after = choices.index(depth)
        depths.append(depth)
    rng.shuffle(depths)
    rng.shuffle(lrs)
    return [{"optim.lr": float(lr), "model.freeze": d} for lr, d in zip(lrs, depths)]
