"""What turns a split's batches into model input, and which random draws an epoch makes.

Images are resized and normalised on the device (and, for training, augmented); the
feature cache's activations go in as they are. An epoch's data order follows from
(train.seed, epoch, rank), and each step's augmentation and dropout from (train.seed, epoch,
step, rank), so a run resumed at any step (an epoch's end, or a checkpoint written inside
one) draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tlray.config.augmentation import from_config as augmentation_from_config
from tlray.data.augment import Augmenter
from tlray.data.ingest import iter_image_batches
from tlray.data.preprocess import to_model_input
from tlray.model.build import ModelInfo
from tlray.train.protocol import WorkerArgs, cache_dataset
from tlray.train.steps import features_input


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one worker's epoch: a function of (train.seed, epoch, rank) alone."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """The seed of one worker's step (its augmentation and dropout draws)."""
    return (epoch_seed(seed, epoch, rank) * 1_000_033 + step) % 2**63


def seed_epoch(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Seeds the epoch's dropout and drop-path draws; returns the generator of its data order."""
    torch.manual_seed(epoch_seed(seed, epoch, rank))
    return torch.Generator().manual_seed(epoch_seed(seed, epoch, rank) + 1)


@dataclass
class TrainFeed:
    """One worker's epoch of training input: model input from a batch, with the epoch's
    augmentation; `seed_step` fixes a step's random draws before it runs."""

    feed: Callable
    augmenter: Augmenter | None
    seed: int
    epoch: int
    rank: int

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.feed(batch)

    def seed_step(self, step: int) -> None:
        seed = step_seed(self.seed, self.epoch, step, self.rank)
        torch.manual_seed(seed)
        if self.augmenter is not None:
            self.augmenter.generator.manual_seed(seed + 1)


@dataclass
class Feeds:
    images: Callable  # uint8 [N, H, W, C] -> normalised model input
    features: Callable  # cached activations -> model input
    augmentation: object
    image_shape: tuple
    cache_shape: tuple | None

    @classmethod
    def for_run(cls, args: WorkerArgs, minfo: ModelInfo) -> Feeds:
        cfg = args.config
        size = (cfg.data.image_size, cfg.data.image_size)
        return cls(images=functools.partial(to_model_input, mean=minfo.data_config["mean"],
                                            std=minfo.data_config["std"], size=size,
                                            channels_last=cfg.train.channels_last),
                   features=functools.partial(features_input,
                                              channels_last=cfg.train.channels_last),
                   augmentation=augmentation_from_config(cfg.data),
                   image_shape=args.dataset.image_shape,
                   cache_shape=args.cache.shape if args.cache else None)

    def train(self, on_cache: bool, seed: int, epoch: int, rank: int) -> TrainFeed:
        augmenter = None
        if on_cache:
            feed = self.features
        elif not self.augmentation.enabled:
            feed = self.images
        else:
            augmenter = Augmenter(self.augmentation, epoch_seed(seed, epoch), rank)
            feed = functools.partial(self.images, augment=augmenter)
        return TrainFeed(feed, augmenter, seed, epoch, rank)

    def evaluation(self, on_cache: bool) -> Callable:
        return self.features if on_cache else self.images

    def batches(self, shards: dict, split: str, on_cache: bool, cfg, device, shuffle=None,
                with_ids: bool = False, skip: int = 0):
        """A split's batches from this worker's shard: the cache's, or the images'; the first
        `skip` left out (an epoch resumed inside)."""
        return iter_image_batches(
            shards[cache_dataset(split) if on_cache else split],
            self.cache_shape if on_cache else self.image_shape, cfg.data.batch_size,
            dtype="float32" if on_cache else "uint8", device=device,
            shuffle=shuffle if cfg.data.shuffle else None, with_ids=with_ids, skip=skip)
