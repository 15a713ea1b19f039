"""The learning-rate range test of the main job's sweep: each freeze depth it tries.

    python jobs/lr_find.py                          # the built-in digits, as tune_mnist.py
    python jobs/lr_find.py --data ~/digit-recognizer --tune.freeze 0,3,all

Prints each depth's suggested learning rate and the range a sweep with
`--tune.lr_min auto --tune.lr_max auto` takes; the plot goes to MLflow (plots/lr_find.png).
Every setting is an option: see --help.
"""

from __future__ import annotations

from pathlib import Path

from tlray.cli.exit import exit_now
from tlray.cli.jobs import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("lr-find", argv, doc=__doc__, prog=Path(__file__).name,
                   recipe="mnist")


if __name__ == "__main__":
    exit_now(main())
