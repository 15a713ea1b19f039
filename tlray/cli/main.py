"""tlray: fine-tune pretrained timm backbones on your images, on Ray, tracked in MLflow.

The commands, in the order of the flow: prepare | inspect | augment-preview | models |
recipes | train | tune | lr-find | compare | predict | benchmark. Each command parses its options,
calls the library and prints a short summary; how it fails is `tlray.cli.errors`' job (a
user error is one line and exit status 2).
"""

from __future__ import annotations

import argparse

from tlray.cli import (bench_commands, data_commands, predict_command, recipe_command,
                       run_commands)
from tlray.cli.errors import USER_ERROR, run_guarded
from tlray.cli.exit import exit_now


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return USER_ERROR
    return run_guarded(lambda: args.run(args), "tlray")


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `--smok` must be an error, not a silent `--smoke`.
    parser = argparse.ArgumentParser(prog="tlray", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(title="commands", parser_class=_NoAbbrevParser)
    data_commands.register(sub)
    recipe_command.register(sub)
    run_commands.register(sub)
    predict_command.register(sub)
    bench_commands.register(sub)
    return parser


class _NoAbbrevParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def run() -> None:
    """The `tlray` command (pyproject's script): `main`, then a quick exit (`exit_now`)."""
    exit_now(main())


if __name__ == "__main__":
    run()
