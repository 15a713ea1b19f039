"""`tlray` command line: prepare | inspect | augment-preview | models | train | tune | compare |
predict | benchmark.

Each sub-command parses its options, calls the library, and prints a short summary.
User errors (`TlrayError`) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tlray.errors import TlrayError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "takes_overrides", False):
            merge_overrides(args, extra)
        return args.run(args) or 0
    except TlrayError as e:
        print(f"tlray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tlray: interrupted", file=sys.stderr)
        return 130


def merge_overrides(args: argparse.Namespace, extra: list[str]) -> argparse.Namespace:
    """Adds `parse_known_args`' leftovers to `args.overrides`; each must be --section.key=value.

    Raises:
        TlrayError: for anything else (a mistyped option, `--model.lr 0.1` with a space).
    """
    for item in extra:
        key, sep, _ = item.partition("=")
        if not (item.startswith("--") and sep and "." in key):
            raise TlrayError(f"unrecognized argument {item!r}: expected an option of this "
                             f"command or a config override --section.key=value")
    args.overrides = [*(getattr(args, "overrides", None) or []), *extra]
    return args


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `--smok` must be an error, not a silent `--smoke`.
    parser = argparse.ArgumentParser(prog="tlray", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(title="commands", parser_class=_NoAbbrevParser)

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
    add_config_arguments(p)
    p.set_defaults(run=_augment_preview)

    p = sub.add_parser("models", help="backbones: describe freeze groups")
    msub = p.add_subparsers(title="models commands")
    d = msub.add_parser("describe", help="print a backbone's parameter groups (freeze depths)")
    d.add_argument("backbone")
    d.set_defaults(run=_models_describe)

    for name, run, help_text in (
            ("train", _train, "one training run on Ray Train, tracked in MLflow"),
            ("tune", _tune, "a Ray Tune sweep over learning rate x freeze depth; registers "
                            "the best model as @champion")):
        p = sub.add_parser(name, help=help_text, description=help_text + ". Any setting can "
                           "be overridden as --section.key=value (see tlray/config.py).")
        add_config_arguments(p)
        if name == "tune":
            p.add_argument("--resume", action="store_true",
                           help="continue the latest unfinished sweep (or --tune.name=NAME)")
        p.set_defaults(run=run)

    from tlray.compare import add_compare_arguments
    from tlray.predict import add_predict_arguments

    p = sub.add_parser("compare", help="scratch CNN vs the transfer model, same budget")
    add_compare_arguments(p)
    p.set_defaults(takes_overrides=True)
    p = sub.add_parser("predict", help="predict a dataset, a Kaggle test.csv or images with "
                                       "an MLflow model (e.g. models:/NAME@champion)")
    add_predict_arguments(p)

    p = sub.add_parser("benchmark", help="speed benchmarks, each against a baseline")
    bsub = p.add_subparsers(title="benchmarks")
    b = bsub.add_parser("ingest", help="Ray Data ingest vs a plain pyarrow read")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--json", action="store_true", help="also print the results as JSON")
    b.set_defaults(run=_benchmark_ingest)
    from tlray.bench_train import add_train_benchmark_arguments

    add_train_benchmark_arguments(bsub.add_parser(
        "train", help="tlray's Ray Train loop vs a plain PyTorch loop"))
    from tlray.bench_sweep import add_sweep_benchmark_arguments

    add_sweep_benchmark_arguments(bsub.add_parser(
        "sweep", help="a whole sweep under two values of one setting (default: with vs without "
                 "the frozen-backbone feature cache)"))
    return parser


class _NoAbbrevParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """--config FILE plus free-form --section.key=value overrides."""
    p.add_argument("--config", help="YAML config file (sections data, model, optim, train, "
                                    "scaling, tracking, tune)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit")
    p.set_defaults(takes_overrides=True)


def load_config(args):
    from tlray import config

    cfg = config.load(args.config, args.overrides)
    if args.print_config:
        print(config.dump_yaml(cfg), end="")
        return None
    return cfg


def _train(args) -> int:
    from tlray import trainer

    cfg = load_config(args)
    if cfg is None:
        return 0
    result = trainer.train(cfg)
    print(trainer.summary(result, cfg.train.monitor))
    return 0


def _tune(args) -> int:
    from tlray import sweep

    cfg = load_config(args)
    if cfg is None:
        return 0
    result = sweep.sweep(cfg, resume=args.resume)
    print(sweep.format_summary(result, cfg.train.monitor))
    return 0


def _prepare(args) -> int:
    from tlray.datasets import parse_fractions, parse_image_size, prepare

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    info = prepare(args.source, args.dest, fractions=parse_fractions(args.split), seed=args.seed,
                   image_size=parse_image_size(args.image_size), mode=args.mode,
                   classes=classes, rows_per_shard=args.rows_per_shard,
                   skip_corrupt=args.skip_corrupt, force=args.force, name=args.name)
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
    from tlray.datasets import load_info, sample_per_class
    from tlray.plots import sample_grid, save_png

    info = load_info(args.dataset)
    print(describe_dataset(info))
    images, labels = sample_per_class(info)
    out = Path(args.out or f"{info.name}-samples.png")
    save_png(sample_grid(images, labels, info.classes), out)
    print(f"sample grid (one image per class): {out}")
    return 0


def _augment_preview(args) -> int:
    from tlray import augment
    from tlray.datasets import load_info, sample_per_class
    from tlray.plots import augmentation_grid, save_png

    cfg = load_config(args)
    if cfg is None:
        return 0
    aug = augment.from_config(cfg.data)
    if not aug.enabled:
        raise TlrayError("nothing to preview: choose an augmentation with --data.augment="
                         f"{'|'.join(p for p in augment.PRESETS if p != 'none')} (and "
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
    from tlray.models import describe_backbone, format_groups

    print(format_groups(args.backbone, describe_backbone(args.backbone)))
    return 0


def run_job(command: str, config_path: str | None, overrides: list[str], **kwargs) -> int:
    """Entry point for jobs/*.py: resolve the config, run, print a summary; clean errors."""
    args = argparse.Namespace(config=config_path, overrides=overrides, print_config=False,
                              **kwargs)
    run = {"train": _train, "tune": _tune}[command]
    try:
        return run(args)
    except TlrayError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2


def _benchmark_ingest(args) -> int:
    from tlray import benchmark

    results = benchmark.ingest(batch_size=args.batch_size)
    print(benchmark.format_ingest(results))
    if args.json:
        print(benchmark.ingest_json(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
