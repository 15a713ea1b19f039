"""The data commands: prepare, inspect, augment-preview, models describe."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tlray.cli.settings import add_settings, config_from_args
from tlray.config import dump_yaml
from tlray.errors import TlrayError

if TYPE_CHECKING:
    from tlray.model.freeze import GroupInfo


def register(sub: argparse._SubParsersAction) -> None:
    from tlray.data.prepare import ENGINES, RAY_FROM_IMAGES

    p = sub.add_parser("prepare", help="validate a labelled image source and write it as a "
                                       "sharded Parquet dataset")
    p.add_argument("source", help="Kaggle CSV dir or train.csv, MNIST IDX dir, image folder or "
                                  ".zip (one sub-folder per class), or builtin:mnist")
    p.add_argument("dest", nargs="?", help="output directory or URI (default: "
                                           "$TLRAY_HOME/datasets/<name>)")
    p.add_argument("--split", default="0.8,0.1,0.1",
                   help="train,val,test fractions (default 0.8,0.1,0.1)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--image-size", help="resize every image to N or HxW at prepare time")
    p.add_argument("--mode", choices=["L", "RGB"], help="force grey (L) or RGB")
    p.add_argument("--classes", help="comma-separated class names in label order")
    p.add_argument("--rows-per-shard", type=int)
    p.add_argument("--skip-corrupt", action="store_true",
                   help="leave out undecodable images (each is listed) instead of failing")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--name", help="dataset name (default: from the destination)")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help=f"where images are decoded and shards written: local (this process), "
                        f"ray (Ray tasks on the cluster's CPUs), auto (default: ray for image "
                        f"folders and zips from {RAY_FROM_IMAGES.said()})")
    p.set_defaults(run=_prepare)

    p = sub.add_parser("inspect", help="counts per split and class, and a sample grid PNG")
    p.add_argument("dataset", help="prepared dataset directory or URI")
    p.add_argument("--out", help="PNG path (default: ./<name>-samples.png)")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("augment-preview", help="a PNG grid of training images as "
                                               "--data.augment would change them")
    p.add_argument("dataset", help="prepared dataset directory or URI")
    p.add_argument("--out", help="PNG path (default: ./<name>-augment-<preset>.png)")
    p.add_argument("--copies", type=int, default=7, help="augmented draws per image (7)")
    add_settings(p, short_flags=False)
    p.set_defaults(run=_augment_preview)

    p = sub.add_parser("models", help="backbones: describe freeze groups")
    msub = p.add_subparsers(title="models commands")
    d = msub.add_parser("describe", help="print a backbone's parameter groups (freeze depths)")
    d.add_argument("backbone")
    d.set_defaults(run=_models_describe)


def _prepare(args) -> int:
    from tlray.data.prepare import parse_fractions, parse_image_size, prepare
    from tlray.train.cluster import init_ray

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    info = prepare(args.source, args.dest, fractions=parse_fractions(args.split), seed=args.seed,
                   image_size=parse_image_size(args.image_size), mode=args.mode,
                   classes=classes, rows_per_shard=args.rows_per_shard,
                   skip_corrupt=args.skip_corrupt, force=args.force, name=args.name,
                   engine=args.engine, connect=init_ray)
    print(describe_dataset(info))
    return 0


def describe_dataset(info) -> str:
    """Counts per split and class as a small table."""
    splits = list(info.splits)
    width = max([len(c) for c in info.classes] + [5])
    lines = [f"dataset {info.name} at {info.uri}",
             f"  images {info.height}x{info.width} {info.mode}, {info.num_classes} classes, "
             f"source {info.source['kind']} {info.source['uri']}",
             "  " + "class".ljust(width) + "".join(f"{s:>9}" for s in splits)]
    for c in info.classes:
        lines.append("  " + c.ljust(width) + "".join(
            f"{info.splits[s].class_counts.get(c, 0):>9}" for s in splits))
    lines.append("  " + "total".ljust(width) + "".join(f"{info.splits[s].rows:>9}"
                                                       for s in splits))
    if info.skipped:
        lines.append(f"  skipped {len(info.skipped)} unreadable item(s), listed in dataset.json")
    return "\n".join(lines)


def _inspect(args) -> int:
    from tlray.data.dataset import load_info, sample_per_class
    from tlray.track.plots import sample_grid, save_png

    info = load_info(args.dataset)
    print(describe_dataset(info))
    images, labels = sample_per_class(info)
    out = Path(args.out or f"{info.name}-samples.png")
    save_png(sample_grid(images, labels, info.classes), out)
    print(f"sample grid (one image per class): {out}")
    return 0


def _augment_preview(args) -> int:
    from tlray.config.augmentation import PRESETS
    from tlray.config.augmentation import from_config as augmentation_from_config
    from tlray.data import augment
    from tlray.data.dataset import load_info, sample_per_class
    from tlray.track.plots import augmentation_grid, save_png

    cfg = config_from_args(args)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    aug = augmentation_from_config(cfg.data)
    if not aug.enabled:
        raise TlrayError("nothing to preview: choose an augmentation with --data.augment="
                         f"{'|'.join(p for p in PRESETS if p != 'none')} (and "
                         f"--data.augment_* to change its values)")
    if args.copies < 1:
        raise TlrayError(f"--copies must be at least 1, got {args.copies}")
    info = load_info(args.dataset)
    images, labels = sample_per_class(info, "train")
    rows = augment.preview(images, aug, cfg.data.image_size, args.copies, cfg.train.seed)
    out = Path(args.out or f"{info.name}-augment-{cfg.data.augment}.png")
    save_png(augmentation_grid(rows, [info.classes[i] for i in labels],
                               f"{cfg.data.augment} ({aug.describe()}), "
                               f"{cfg.data.image_size} px"), out)
    print(f"{len(rows)} training images, each as is and {args.copies} augmented draws "
          f"({aug.describe()}): {out}")
    return 0


def _models_describe(args) -> int:
    from tlray.model.build import describe_backbone

    print(format_groups(args.backbone, describe_backbone(args.backbone)))
    return 0


def format_groups(backbone: str, groups: Sequence[GroupInfo]) -> str:
    """A table of the groups and the valid freeze values, for ``tlray models describe``."""
    if not groups:
        return f"{backbone}: no timm group_matcher; only freeze 0 (train everything) is valid"
    width = max(len("group"), *(len(g.name) for g in groups))
    lines = [
        f"{backbone}: {len(groups)} coarse parameter groups, stem first "
        "(the classifier head always trains)",
        f"{'index':>5}  {'group':<{width}}  {'params':>12}  frozen by",
    ]
    for g in groups:
        lines.append(f"{g.index:>5}  {g.name:<{width}}  {g.n_params:>12,}  freeze >= {g.index + 1}")
    n = len(groups)
    lines.append(
        f"valid freeze values: 0 (train everything) .. {n}, or 'all' (= {n}: train only the head)"
    )
    return "\n".join(lines)

