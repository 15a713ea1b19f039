"""The run commands: train, tune, compare. Each takes every setting as an option (`--help`
lists them, grouped by section, with defaults) and starts from one preflight plan."""

from __future__ import annotations

import argparse

from tlray.cli.settings import add_settings, config_from_args, given_settings
from tlray.config import Config, dump_yaml, with_overrides

COMPARE_SMOKE = ("train.epochs=1", "data.image_size=32", "scaling.num_workers=2",
                 "scaling.cpus_per_worker=0.5")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="one training run on Ray Train, tracked in MLflow",
                       description="One training run on Ray Train, tracked in MLflow.")
    add_settings(p)
    p.set_defaults(run=train_command)

    p = sub.add_parser("tune", help="a Ray Tune sweep over learning rate x freeze depth; "
                                    "registers the best model as @champion",
                       description="A Ray Tune sweep over learning rate x freeze depth; "
                                   "registers the best model as @champion.")
    add_settings(p, sweep=True)
    p.set_defaults(run=tune_command)

    p = sub.add_parser("lr-find", help="learning-rate range test of each freeze depth the "
                                       "sweep tries: a plot and suggested rates",
                       description="A learning-rate range test (an exponential ramp over at "
                                   "most one epoch, on the training images) for each of "
                                   "tune.freeze's depths (a schedule: its first phase); the "
                                   "plot and the suggestions go to MLflow.")
    add_settings(p)
    p.set_defaults(run=lr_find_command)

    p = sub.add_parser("compare", help="scratch CNN vs the transfer model, same budget",
                       description="Trains the configured transfer model and the malaria "
                                   "original's scratch CNN on the same splits with the same "
                                   "budget, and puts them side by side.")
    add_compare_options(p)
    add_settings(p)
    p.set_defaults(run=compare_command)


def add_compare_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scratch", dest="scratch_overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="a setting for the scratch model only: optim.* or "
                        "model.head/freeze/drop_rate (repeatable), e.g. optim.lr=3e-4")
    p.add_argument("--smoke", action="store_true",
                   help="tiny budget: 1 epoch, 32 px, 2 workers x 0.5 CPU (the transfer "
                        "backbone stays as configured)")


def resolved(args: argparse.Namespace, defaults: list[str] | None = None,
             chosen: list[str] | None = None, recipe=None) -> Config | None:
    """The command's config, its dataset found (or prepared); None (after printing the
    config) with --print-config.

    The dataset is resolved here, before the run's modules import torch, timm, Ray and
    MLflow: a wrong path then fails in a second instead of six.
    """
    cfg = config_from_args(args, defaults, chosen, recipe)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return None
    from tlray.data.prepare import resolve_dataset

    return with_overrides(cfg, **{"data.dataset": resolve_dataset(cfg.data.dataset).uri})


def train_command(args: argparse.Namespace, defaults: list[str] | None = None,
                  chosen: list[str] | None = None, recipe=None) -> int:
    cfg = resolved(args, defaults, chosen, recipe)
    if cfg is not None:
        from tlray.train.plan import preflight
        from tlray.train.run import summary, train

        print(summary(train(preflight(cfg))))
    return 0


def tune_command(args: argparse.Namespace, defaults: list[str] | None = None,
                 chosen: list[str] | None = None, recipe=None) -> int:
    cfg = resolved(args, defaults, chosen, recipe)
    if cfg is not None:
        from tlray.tune.pick import format_summary
        from tlray.tune.sweep import sweep

        from tlray.cli import STARTED_AT

        result = sweep(cfg, resume=args.resume, more=args.more,
                       fixed=given_settings(args, chosen), started_at=STARTED_AT)
        print(format_summary(result, cfg.train.monitor))
    return 0


def lr_find_command(args: argparse.Namespace, defaults: list[str] | None = None,
                    chosen: list[str] | None = None, recipe=None) -> int:
    cfg = resolved(args, defaults, chosen, recipe)
    if cfg is not None:
        from tlray.train.lr_find import find_and_log

        print(find_and_log(cfg))
    return 0


def compare_command(args: argparse.Namespace, defaults: list[str] | None = None,
                    chosen: list[str] | None = None, recipe=None) -> int:
    cfg = resolved(args, defaults, [*(chosen or []), *(COMPARE_SMOKE if args.smoke else ())],
                   recipe)
    if cfg is not None:
        from tlray.compare.experiment import compare
        from tlray.compare.report import format_comparison

        print(format_comparison(compare(cfg, scratch_overrides=list(args.scratch_overrides))))
    return 0
