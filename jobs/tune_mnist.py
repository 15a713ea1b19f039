"""Experiment 1: EfficientNet (ImageNet) -> MNIST digits, swept over learning rate x freeze depth.

    python jobs/tune_mnist.py                        # offline: built-in 5,000 digits, packaged
                                                     # ImageNet EfficientNet-Lite0, 2-core CPU
    python jobs/tune_mnist.py --data ~/digit-recognizer          # Kaggle CSVs (or an IDX dir)
    python jobs/tune_mnist.py --data ~/digit-recognizer --backbone efficientnet_b0 \\
        --weights timm --image-size 224 --epochs 5 --gpu          # the original, on a GPU
    ray job submit --working-dir . -- python jobs/tune_mnist.py --data s3://bucket/mnist

Prints its plan (how many trials of how many epochs fit its time budget, `--budget`), Tune's
trial table while it runs, then the best config, its validation and test metrics and the
registered model. Every setting is an option (--section.key VALUE): see --help. Its settings
are the recipe `tlray/config/recipes/mnist.yaml` (`tlray recipes show mnist`), each commented
with what it bought.
"""

from __future__ import annotations

from pathlib import Path

from tlray.cli.exit import exit_now
from tlray.cli.jobs import run_job

SMOKE = ["data.image_size=32", "train.epochs=1", "tune.num_samples=2", "tune.grace_period=1",
         "tune.freeze=0,all", "scaling.cpus_per_worker=0.5",  # a schedule needs 2 epochs
         "tune.budget=none"]


def main(argv: list[str] | None = None) -> int:
    return run_job("tune", argv, doc=__doc__, prog=Path(__file__).name, recipe="mnist",
                   smoke=SMOKE)


if __name__ == "__main__":
    exit_now(main())
