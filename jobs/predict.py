"""Predict images with a registered tlray model and write a CSV (Kaggle submission or probs).

    python jobs/predict.py models:/mnist-efficientnet_b0@champion data/digit-recognizer/test.csv
    python jobs/predict.py models:/malaria-resnet50/3 ~/.tlray/datasets/malaria --split test
    ray job submit --working-dir . -- python jobs/predict.py MODEL_URI SOURCE --out preds.csv

The same as `tlray predict`: prints one summary line (rows, where the CSV was written,
predicted class counts); a user error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys

from tlray.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
