"""The job scripts' command line (`jobs/*.py`, what `ray job submit` runs).

A job is a run command (train, tune or compare) with its own defaults: it takes exactly the
options of that command (every setting, the short flags `--data`, `--backbone`,
`--weights`, `--image-size`, `--epochs`, `--gpu`, ...), `--smoke` for a tiny budget, and
`--resume` for a sweep; its `--help` lists them all with the job's docstring.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from tlray.cli.errors import run_guarded
from tlray.cli.run_commands import (
    add_compare_options,
    compare_command,
    lr_find_command,
    train_command,
    tune_command,
)
from tlray.cli.settings import add_settings
from tlray.config import recipes

COMMANDS = {"train": train_command, "tune": tune_command, "compare": compare_command,
            "lr-find": lr_find_command}


def run_job(command: str, argv: Sequence[str] | None, *, doc: str, prog: str | None = None,
            recipe: str | None = None, defaults: Sequence[str] = (),
            smoke: Sequence[str] = (),
            before: Callable[[argparse.Namespace], list[str]] | None = None) -> int:
    """Parses a job's options and runs it; returns the exit status.

    Args:
        command: train, tune, compare or lr-find.
        doc: the job's docstring: its first line describes it in `--help`, the rest follows.
        prog: the job's name in messages (default: the script that runs).
        recipe: the job's recipe (`tlray.config.recipes`): its settings, under everything
            the user gives.
        defaults: more of the job's own settings, on top of its recipe.
        smoke: what `--smoke` stands for (compare has its own).
        before: runs first with the parsed options and returns more settings (e.g. the
            dataset it prepared); it may raise `TlrayError`.
    """
    prog = prog or os.path.basename(sys.argv[0])
    first, _, rest = doc.strip().partition("\n")
    parser = argparse.ArgumentParser(prog=prog, description=first, epilog=rest.strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    if command == "compare":
        add_compare_options(parser)
    elif smoke:
        parser.add_argument("--smoke", action="store_true", help="a tiny budget, for tests")
    add_settings(parser, sweep=command == "tune")
    args = parser.parse_args(argv)

    def go() -> int:
        chosen = list(smoke) if command != "compare" and getattr(args, "smoke", False) else []
        if before is not None and not args.print_config:
            chosen += before(args)
        return COMMANDS[command](args, list(defaults), chosen,
                                 recipes.path(recipe) if recipe else None)

    return run_guarded(go, prog)
