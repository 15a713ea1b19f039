"""`tlray` command line: prepare | inspect | models | benchmark.

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
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except TlrayError as e:
        print(f"tlray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tlray: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(title="commands")

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

    p = sub.add_parser("models", help="backbones: describe freeze groups")
    msub = p.add_subparsers(title="models commands")
    d = msub.add_parser("describe", help="print a backbone's parameter groups (freeze depths)")
    d.add_argument("backbone")
    d.set_defaults(run=_models_describe)

    p = sub.add_parser("benchmark", help="speed benchmarks, each against a baseline")
    bsub = p.add_subparsers(title="benchmarks")
    b = bsub.add_parser("ingest", help="Ray Data ingest vs a plain pyarrow read")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--json", action="store_true", help="also print the results as JSON")
    b.set_defaults(run=_benchmark_ingest)
    return parser


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


def _models_describe(args) -> int:
    from tlray.models import describe_backbone, format_groups

    print(format_groups(args.backbone, describe_backbone(args.backbone)))
    return 0


def _benchmark_ingest(args) -> int:
    from tlray import benchmark

    results = benchmark.ingest(batch_size=args.batch_size)
    print(benchmark.format_ingest(results))
    if args.json:
        print(benchmark.ingest_json(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
