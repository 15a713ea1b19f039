"""Experiment 2: malaria cell images (NIH, Parasitized vs Uninfected), transfer learning swept.

    python jobs/tune_malaria.py --data ~/cell_images          # or cell_images.zip
    python jobs/tune_malaria.py --data ~/cell_images --gpu    # ResNet50 at 128 px on GPUs
    python jobs/tune_malaria.py --data ~/cell_images --backbone tf_efficientnet_lite0 \\
        --weights packaged                                     # offline: packaged weights

The data is the NIH `cell_images/{Parasitized,Uninfected}/*.png` layout (27,558 images),
published by the U.S. National Library of Medicine (lhncbc.nlm.nih.gov, "Malaria Datasets")
and as TensorFlow Datasets' `malaria`. As in the original: resized to 128x128, split
60/20/20, batch 30, ImageNet ResNet50 with a dense 256 / dropout 0.4 / dense 128 head,
NAdam, accuracy and AUC, early stopping with patience 5 on val_loss; training images get
the `microscopy` augmentation (`--data.augment none` turns it off). Its settings are the
recipe `tlray/config/recipes/malaria.yaml` (`tlray recipes show malaria`), each commented.

Beyond the original: the sweep compares fine-tuning recipes as well as depths. `all:2,0@0.3`
trains the new head alone for two epochs (the frozen backbone runs forward only, no
backward: about a third of a full epoch's work; with `--data.augment none` those epochs
read the feature cache instead and cost next to nothing), then the whole network at 0.3x
the rate: the new head's large early gradients never reach the pretrained layers, as in
fastai's fine_tune. Cells have no up, down, left or right, so the test split and the served
model average the 8 flips and quarter turns of every image (`model.tta=dihedral`, 8x the
inference cost), and the weights are averaged over the last steps (`train.ema`), which
smooths the noisy small-batch (30) updates. Every setting is an option: see --help.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tlray.cli.exit import exit_now
from tlray.cli.jobs import run_job
from tlray.errors import TlrayError

DATA = "setting:data.dataset"  # where --data lands


def prepare_cells(args: argparse.Namespace) -> list[str]:
    """The NIH folder (or .zip) prepared as the original splits it: 128x128 RGB, 60/20/20."""
    from tlray.data.prepare import prepare

    source = getattr(args, DATA, None)
    if not source or not (Path(source).expanduser().exists() or "://" in source):
        raise TlrayError(
            f"no malaria data at {source or '(none given)'}. Download the NIH 'cell_images' "
            "set (27,558 PNGs in Parasitized/ and Uninfected/) from lhncbc.nlm.nih.gov "
            "(Malaria Datasets) or as TensorFlow Datasets' 'malaria', then pass --data PATH "
            "(folder or .zip).")
    info = prepare(source, image_size=(128, 128), mode="RGB",
                   fractions={"train": 0.6, "val": 0.2, "test": 0.2}, name="malaria")
    setattr(args, DATA, info.uri)
    return []


def main(argv: list[str] | None = None) -> int:
    return run_job("tune", argv, doc=__doc__, prog=Path(__file__).name, recipe="malaria",
                   before=prepare_cells)


if __name__ == "__main__":
    exit_now(main())
