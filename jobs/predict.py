"""Predict images with a registered tlray model and write a CSV (Kaggle submission or probs).

    python jobs/predict.py models:/mnist-efficientnet_b0@champion data/digit-recognizer/test.csv
    python jobs/predict.py models:/malaria-resnet50/3 ~/.tlray/datasets/malaria --split test
    ray job submit --working-dir . -- python jobs/predict.py MODEL_URI SOURCE --out preds.csv

Prints one summary line (rows, where the CSV was written, predicted class counts); a user
error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from tlray.errors import TlrayError
from tlray.predict import add_predict_arguments, run_predict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_predict_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_predict(args)
    except TlrayError as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
