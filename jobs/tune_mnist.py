"""Experiment 1: EfficientNet (ImageNet) -> MNIST digits, swept over learning rate x freeze depth.

    python jobs/tune_mnist.py                        # offline: built-in 5,000 digits, packaged
                                                     # ImageNet EfficientNet-Lite0, 2-core CPU
    python jobs/tune_mnist.py --data ~/digit-recognizer          # Kaggle CSVs (or an IDX dir)
    python jobs/tune_mnist.py --data ~/digit-recognizer --backbone efficientnet_b0 \\
        --weights timm --image-size 224 --epochs 5 --gpu          # the original, on a GPU
    ray job submit --working-dir . -- python jobs/tune_mnist.py --data s3://bucket/mnist

Prints Tune's trial table while it runs, then the best config, its validation and test
metrics and the registered model. Any setting can be overridden as --section.key=value.
"""

from __future__ import annotations

import argparse
import sys

from tlray.cli import run_job
from tlray.presets import MNIST_SWEEP

DEFAULTS = MNIST_SWEEP  # see tlray.presets
SMOKE = ["--data.image_size=32", "--train.epochs=1", "--tune.num_samples=2",
         "--tune.grace_period=1", "--scaling.cpus_per_worker=0.5"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="builtin:mnist",
                        help="Kaggle digit-recognizer dir, MNIST IDX dir, prepared dataset, "
                             "or builtin:mnist (default)")
    parser.add_argument("--backbone", help="timm model (default tf_efficientnet_lite0)")
    parser.add_argument("--weights", help="packaged (default), timm, none, file:PATH, "
                                          "models:/NAME@ALIAS")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--num-samples", type=int, help="trials")
    parser.add_argument("--gpu", action="store_true", help="one GPU per Train worker")
    parser.add_argument("--smoke", action="store_true", help="a tiny budget, for tests")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    parser.add_argument("--config", help="YAML config file")
    args, overrides = parser.parse_known_args(argv)
    chosen = [f"--data.dataset={args.data}"]
    for flag, key in ((args.backbone, "model.backbone"), (args.weights, "model.weights"),
                      (args.image_size, "data.image_size"), (args.epochs, "train.epochs"),
                      (args.num_samples, "tune.num_samples")):
        if flag is not None:
            chosen.append(f"--{key}={flag}")
    if args.gpu:
        chosen += ["--scaling.use_gpu=true", "--scaling.cpus_per_worker=4"]
    return run_job("tune", args.config, DEFAULTS + (SMOKE if args.smoke else []) + chosen
                   + overrides, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
