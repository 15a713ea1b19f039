"""Score images with a registered tlray model on the Ray cluster; write a CSV or Parquet shards.

    ray job submit --working-dir . -- python jobs/predict.py \\
        models:/malaria-resnet50@champion s3://bucket/incoming/ --out s3://bucket/scores.parquet
    ray job submit --working-dir . -- python jobs/predict.py \\
        models:/mnist-efficientnet_b0@champion data/digit-recognizer/test.csv --gpu
    python jobs/predict.py models:/NAME@champion ~/.tlray/datasets/malaria --split test

The same as `tlray predict`, except that the scoring runs on the cluster by default (a pool of
model replicas reading the images themselves: `--replicas`, `--cpus-per-replica`, `--gpu`;
`--engine local` scores in the job's own process). Prints a progress bar and one summary line
(rows, where the output went, predicted class counts); a user error is one line on stderr and
exit status 2; the output is complete or absent.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tlray.cli.errors import run_guarded
from tlray.cli.exit import exit_now
from tlray.cli.predict_command import add_predict_options


def main(argv: list[str] | None = None) -> int:
    first, _, rest = __doc__.strip().partition("\n")
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=first,
                                     epilog=rest.strip(), allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_predict_options(parser, engine="ray")
    args = parser.parse_args(argv)
    return run_guarded(lambda: args.run(args), parser.prog)


if __name__ == "__main__":
    exit_now(main())
