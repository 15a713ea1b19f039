"""Every setting as a command-line option, from the config dataclasses themselves.

`add_settings(parser)` gives a command (train, tune, compare, the job scripts) one option per
setting, `--section.key VALUE` (or `=VALUE`), grouped by section in `--help` with its
default and help text, plus the short flags every run command shares (`--data`,
`--backbone`, ...), `--config FILE`, `--set section.key=value` and `--print-config`.
`config_from_args` resolves them, in this order: a job's own defaults, `--config`, the short
flags, then the settings as given.
"""

from __future__ import annotations

import argparse

from tlray.config import Config, load
from tlray.config.resolve import field_type
from tlray.config.settings import all_settings, sections

SETTING_PREFIX = "setting:"
# Short flags shared by every run command and job script: flag -> (setting, value type, help).
SHORT_FLAGS = {
    "--data": ("data.dataset", str, "a prepared dataset, or a source to prepare (a Kaggle CSV "
                                    "dir, MNIST IDX dir, image folder or .zip, builtin:mnist)"),
    "--backbone": ("model.backbone", str, "timm model name (see `tlray models describe`)"),
    "--weights": ("model.weights", str, "packaged | timm | none | file:PATH | "
                                        "models:/NAME@ALIAS"),
    "--freeze": ("model.freeze", str, "frozen groups from the stem: 0 .. N, or all"),
    "--image-size": ("data.image_size", int, "model input side in px"),
    "--epochs": ("train.epochs", int, "epochs to train"),
    "--lr": ("optim.lr", float, "peak learning rate"),
    "--num-samples": ("tune.num_samples", int, "sweep trials"),
    "--budget": ("tune.budget", str, "a sweep's time budget (90s, 2m, 20m, 1h30m): it plans "
                                     "its trials, epochs and early stopping to end within it"),
}
GPU_SETTINGS = ("scaling.use_gpu=true", "scaling.cpus_per_worker=4")


def add_settings(parser: argparse.ArgumentParser, *, sweep: bool = False,
                 short_flags: bool = True, config_file: bool = True) -> None:
    """The config options of a command.

    Args:
        sweep: add `--resume`.
        short_flags: add `SHORT_FLAGS` and `--gpu` (a benchmark has flags of its own).
        config_file: add `--config FILE` and `--print-config`.
    """
    parser.usage = "%(prog)s [options] [--section.key VALUE ...]"
    common = parser.add_argument_group("common options")
    if config_file:
        common.add_argument("--config", metavar="FILE", help="YAML config file (sections "
                            "data, model, optim, train, scaling, tracking, tune)")
        common.add_argument("--print-config", action="store_true",
                            help="print the resolved config and exit")
    common.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="a setting (repeatable); the same "
                        "as --section.key=VALUE")
    if short_flags:
        _add_short_flags(common)
    if sweep:
        common.add_argument("--resume", action="store_true",
                            help="continue the latest unfinished sweep (or --tune.name=NAME) "
                                 "where it stopped")
        common.add_argument("--more", type=int, default=0, metavar="N",
                            help="add N trials to the latest sweep (or --tune.name=NAME), "
                                 "finished or not, continuing its design")
    _add_every_setting(parser)


def _add_short_flags(common) -> None:
    for flag, (key, kind, text) in SHORT_FLAGS.items():
        common.add_argument(flag, dest=SETTING_PREFIX + key, type=kind, default=argparse.SUPPRESS,
                            metavar=flag.lstrip("-").upper().replace("-", "_"),
                            help=f"{text} (= --{key})")
    common.add_argument("--gpu", action="store_true",
                        help="one GPU per Train worker (= " + " ".join(
                            f"--{s}" for s in GPU_SETTINGS) + ")")


def _add_every_setting(parser: argparse.ArgumentParser) -> None:
    groups = {}
    for name, section in sections().items():
        title = f"{name} settings" if section else "storage"
        description = (section.__doc__ or "").strip().splitlines()[0] if section else None
        groups[name] = parser.add_argument_group(title, description)
    for key, f, default in all_settings():
        base, _ = field_type(f.type)
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        shown = "empty" if default is None else _shown(default)
        extra = {"nargs": "?", "const": "true"} if base is bool else {}
        groups[key.partition(".")[0]].add_argument(
            f"--{key}", dest=SETTING_PREFIX + key, default=argparse.SUPPRESS,
            metavar="|".join(choices) if choices else base.__name__.upper(),
            help=f"{help_text} (default: {shown})".replace("%", "%%"), **extra)


def config_from_args(args: argparse.Namespace, defaults: list[str] | None = None,
                     chosen: list[str] | None = None, recipe=None) -> Config:
    """The config the options name: a job's recipe (a YAML file) and `defaults`, then
    --config FILE, then `chosen` (what a flag such as --smoke stands for), then the options
    as given."""
    base = load(recipe, list(defaults or []))
    return load(getattr(args, "config", None), [*(chosen or []), *overrides_from_args(args)],
                base=base)


def given_settings(args: argparse.Namespace, chosen: list[str] | None = None) -> frozenset[str]:
    """The settings the user gave on the command line (or a flag such as --smoke stands
    for): what a sweep's budget plan must keep as it is."""
    return frozenset(o.partition("=")[0] for o in [*(chosen or []),
                                                   *overrides_from_args(args)])


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The options given, as `section.key=value` overrides in the order they apply."""
    given = vars(args)
    out = [*(GPU_SETTINGS if given.get("gpu") else ())]
    short = {key for key, _, _ in SHORT_FLAGS.values()}
    settings = [(k[len(SETTING_PREFIX):], v) for k, v in given.items()
                if k.startswith(SETTING_PREFIX)]
    out += [f"{k}={v}" for k, v in settings if k in short]
    out += [f"{k}={v}" for k, v in settings if k not in short]
    return out + list(given.get("overrides") or [])


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
