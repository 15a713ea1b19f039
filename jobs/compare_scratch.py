"""Transfer vs scratch on one dataset: the malaria original's experiment, logged to MLflow.

Trains the configured transfer model (default: tf_efficientnet_lite0 with the packaged
ImageNet weights) and the original's small CNN from scratch on the same splits with the same
budget, and prints a side-by-side table (test accuracy, AUC, loss, seconds per epoch,
trained parameters) and where the MLflow runs are.

    python jobs/compare_scratch.py --smoke
    python jobs/compare_scratch.py --data ~/.tlray/datasets/malaria --image-size 128 \\
        --data.batch_size 30 --optim.name nadam --epochs 20 --train.patience 5 \\
        --backbone resnet50 --weights timm --model.head mlp --freeze all
    ray job submit --working-dir . -- python jobs/compare_scratch.py --gpu

Every setting (--section.key VALUE) applies to both models; `--scratch optim.lr=3e-4`
changes the scratch model's optimizer or head only. A user error is one line on stderr and
exit status 2.
"""

from __future__ import annotations

from pathlib import Path

from tlray.cli.exit import exit_now
from tlray.cli.jobs import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("compare", argv, doc=__doc__, prog=Path(__file__).name)


if __name__ == "__main__":
    exit_now(main())
