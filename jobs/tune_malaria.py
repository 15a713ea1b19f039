"""Experiment 2: malaria cell images (NIH, Parasitized vs Uninfected), transfer learning swept.

    python jobs/tune_malaria.py --data ~/cell_images          # or cell_images.zip
    python jobs/tune_malaria.py --data ~/cell_images --gpu    # ResNet50 at 128 px on GPUs

The data is the NIH `cell_images/{Parasitized,Uninfected}/*.png` layout (27,558 images),
published by the U.S. National Library of Medicine (lhncbc.nlm.nih.gov, "Malaria Datasets")
and as TensorFlow Datasets' `malaria`. As in the original: resized to 128x128, split
60/20/20, batch 30, ImageNet ResNet50 with a dense 256 / dropout 0.4 / dense 128 head,
NAdam, accuracy and AUC, early stopping with patience 5 on val_loss; training images get
the `microscopy` augmentation (tlray/augment.py; `--data.augment=none` turns it off).
Offline, use `--backbone tf_efficientnet_lite0 --weights packaged`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tlray.cli import run_job
from tlray.datasets import prepare
from tlray.errors import TlrayError

DEFAULTS = ["--model.backbone=resnet50", "--model.weights=timm", "--model.head=mlp",
            "--data.image_size=128", "--data.batch_size=30", "--optim.name=nadam",
            "--optim.weight_decay=0", "--train.epochs=20", "--train.patience=5",
            "--train.monitor=val_loss", "--tune.num_samples=8", "--tune.lr_min=1e-5",
            "--tune.lr_max=1e-3", "--tune.champion_metric=test_auc",
            # Cells have no up or left: the 8 flips / quarter turns, and a mild zoom.
            "--data.augment=microscopy"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=False,
                        help="the NIH cell_images folder or its .zip, or a prepared dataset")
    parser.add_argument("--gpu", action="store_true", help="one GPU per Train worker")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--config")
    args, overrides = parser.parse_known_args(argv)
    if not args.data or not (Path(args.data).expanduser().exists() or "://" in args.data):
        print("tune_malaria: error: no malaria data at "
              f"{args.data or '(none given)'}. Download the NIH 'cell_images' set (27,558 PNGs "
              "in Parasitized/ and Uninfected/) from lhncbc.nlm.nih.gov (Malaria Datasets) or "
              "as TensorFlow Datasets' 'malaria', then pass --data PATH (folder or .zip).",
              file=sys.stderr)
        return 2
    try:
        info = prepare(args.data, image_size=(128, 128), mode="RGB",
                       fractions={"train": 0.6, "val": 0.2, "test": 0.2}, name="malaria")
    except TlrayError as e:
        print(f"tune_malaria: error: {e}", file=sys.stderr)
        return 2
    chosen = [f"--data.dataset={info.uri}"]
    if args.gpu:
        chosen += ["--scaling.use_gpu=true", "--scaling.cpus_per_worker=4"]
    return run_job("tune", args.config, DEFAULTS + chosen + overrides, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
