"""Transfer vs scratch on one dataset: the malaria original's experiment, logged to MLflow.

Trains the configured transfer model (default: tf_efficientnet_lite0 with the packaged
ImageNet weights) and the original's small CNN from scratch on the same splits with the same
budget, and prints a side-by-side table (test accuracy, AUC, loss, seconds per epoch,
trained parameters) and where the MLflow runs are.

    python jobs/compare_scratch.py --smoke
    python jobs/compare_scratch.py --data ~/.tlray/datasets/malaria --data.image_size=128 \\
        --data.batch_size=30 --optim.name=nadam --train.epochs=20 --train.patience=5 \\
        --model.backbone=resnet50 --model.weights=timm --model.head=mlp --model.freeze=all
    ray job submit --working-dir . -- python jobs/compare_scratch.py --scaling.use_gpu=true

Any `--section.key=value` is a config override for both models; `--scratch optim.lr=3e-4`
changes the scratch model's optimizer or head only. A user error is one line on stderr and
exit status 2.
"""

from __future__ import annotations

import sys

from tlray import cli


def main(argv: list[str] | None = None) -> int:
    return cli.main(["compare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
