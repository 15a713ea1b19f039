"""`tlray recipes`: the recipes a job runs, listed or shown, to copy and change."""

from __future__ import annotations

import argparse

from tlray.config import recipes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="the jobs' recipes (YAML): list them, or show one to "
                                       "copy (tlray recipes show mnist > mine.yaml)")
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("name", nargs="?", help=f"the recipe to show: {', '.join(recipes.NAMES)}")
    p.set_defaults(run=_recipes)


def _recipes(args) -> int:
    if args.action == "show":
        print(recipes.text(args.name or ""), end="")
        return 0
    for name in recipes.NAMES:
        first = recipes.text(name).splitlines()[0].lstrip("# ")
        print(f"{name:<10} {first}  ({recipes.path(name)})")
    print("run one: --config FILE on any run command; start your own: "
          "tlray recipes show NAME > mine.yaml")
    return 0
