"""`tlray benchmark ingest|train|sweep|prepare|predict`: each times tlray against a baseline in
the same run."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from tlray.cli.settings import add_settings, overrides_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="speed benchmarks, each against a baseline")
    bsub = p.add_subparsers(title="benchmarks")
    b = bsub.add_parser("ingest", help="Ray Data ingest vs a plain pyarrow read")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--json", action="store_true", help="also print the results as JSON")
    b.set_defaults(run=ingest_command)
    add_train_options(bsub.add_parser("train", help="tlray's Ray Train loop vs a plain "
                                                    "PyTorch loop"))
    add_sweep_options(bsub.add_parser(
        "sweep", help="a whole sweep under two values of one setting (default: with vs "
                      "without the frozen-backbone feature cache)"))
    add_prepare_options(bsub.add_parser("prepare", help="tlray prepare of an image folder: "
                                                        "in this process vs Ray tasks"))
    add_predict_options(bsub.add_parser("predict", help="tlray predict of an image folder: the "
                                                        "local loop vs the Ray pipeline"))


def add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", help="timm model (default: tf_efficientnet_lite0 on CPU, "
                                           "efficientnet_b0 on CUDA)")
    parser.add_argument("--weights", help="weight source (default: packaged for "
                                          "tf_efficientnet_lite0 on CPU, else none)")
    parser.add_argument("--image-size", type=int, help="model input px (default 32 CPU, "
                                                       "224 CUDA)")
    parser.add_argument("--data-size", type=int,
                        help="stored image px, resized on the device (default: "
                             "min(image size, 64))")
    parser.add_argument("--batch-size", type=int, help="per worker (default 64 CPU, 256 CUDA)")
    parser.add_argument("--steps", type=int, help="timed steps per pass / epoch (default 100)")
    parser.add_argument("--epochs", type=int, help="tlray epochs, the first one warm-up; the "
                                                   "plain loop runs epochs-1 passes (default 3)")
    parser.add_argument("--warmup", type=int, help="untimed plain steps (default 10 CPU, "
                                                    "30 CUDA)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    parser.add_argument("--threads", type=int,
                        help="CPUs per Ray worker, hence its torch threads; the plain loop "
                             "uses the same count (default: cpus_per_worker 1 -> 1 thread)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--notice-checks", action="store_true",
                        help="also time asking Ray Train for a preemption notice after every "
                             "step against never asking (one more tlray run)")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    add_settings(parser, short_flags=False, config_file=False)
    parser.set_defaults(run=train_command)


def add_sweep_options(p: argparse.ArgumentParser) -> None:
    from tlray.bench.sweep import DEFAULT_COMPARE

    p.add_argument("--compare", default=DEFAULT_COMPARE, metavar="SECTION.KEY=A,B",
                   help="the setting whose two values are timed, candidate first (default "
                        f"{DEFAULT_COMPARE}; on GPUs e.g. tune.trials_per_gpu=4,1)")
    p.add_argument("--workdir", help="where both sides keep their Ray results and caches "
                                     "(default: a new temporary directory)")
    p.add_argument("--regret", action="store_true",
                   help="instead of timing two values: run the sweep as configured, train "
                        "every config it stopped early to the end, and print how much the "
                        "sweep's pick leaves on the table (its regret) and both wall times")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    add_settings(p, short_flags=False)
    p.set_defaults(run=sweep_command)


def add_prepare_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=20_000, help="PNGs in the synthetic folder "
                                                               "(default 20,000)")
    p.add_argument("--side", type=int, default=96, help="their side in px (default 96)")
    p.add_argument("--spread", type=int, default=16, help="sides vary by up to this many px "
                                                          "(default 16)")
    p.add_argument("--image-size", type=int, default=64, help="prepared size (default 64)")
    p.add_argument("--engines", type=_engines, default=("local", "ray"),
                   help="local,ray (default) or one of them")
    _add_side_by_side_options(p, small=2_000, repeats=3, kept="the synthetic folder is")
    p.set_defaults(run=prepare_command)


def add_predict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=20_000, help="PNGs scored (default 20,000)")
    p.add_argument("--model", help="an MLflow model URI to score with (default: a "
                                   "tf_efficientnet_lite0 at 32 px, logged by the benchmark)")
    p.add_argument("--batch-size", type=int, default=256)
    _add_side_by_side_options(p, small=1_000, repeats=2,
                              kept="the images and the model are")
    p.set_defaults(run=predict_command)


def _add_side_by_side_options(p: argparse.ArgumentParser, *, small: int, repeats: int,
                              kept: str) -> None:
    """The options the prepare and predict benchmarks share: a small run beside the large
    one, repeats taking turns, a kept work directory, JSON."""
    p.add_argument("--small", type=int, default=small,
                   help="also time this many images, for each side's start-up cost and the "
                        f"crossover (0: skip; default {small:,})")
    p.add_argument("--repeats", type=int, default=repeats,
                   help=f"runs of each side, taking turns; the fastest counts (default "
                        f"{repeats})")
    p.add_argument("--workdir", help=f"where {kept} kept between runs (default: a new "
                                     "temporary directory)")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")


def prepare_command(args: argparse.Namespace) -> int:
    from tlray.bench.prepare import prepare_benchmark

    result = prepare_benchmark(images=args.images, side=args.side, spread=args.spread,
                               image_size=args.image_size, small=args.small,
                               engines=args.engines, repeats=args.repeats,
                               workdir=args.workdir)
    return _report(result, "task", args.json)


def _report(result, workers: str, as_json: bool) -> int:
    """A side-by-side benchmark's table (its Ray processes called `workers`), then JSON."""
    print(result.format(workers=workers))
    if as_json:
        print(result.json())
    return 0


def _engines(text: str) -> tuple[str, ...]:
    engines = tuple(e.strip() for e in text.split(",") if e.strip())
    if not engines or set(engines) - {"local", "ray"}:
        raise argparse.ArgumentTypeError(f"expected local, ray or local,ray; got {text!r}")
    return engines


def predict_command(args: argparse.Namespace) -> int:
    from tlray.bench.predict import predict_benchmark

    result = predict_benchmark(images=args.images, small=args.small, model=args.model,
                               batch_size=args.batch_size, repeats=args.repeats,
                               workdir=args.workdir)
    return _report(result, "replica", args.json)


def ingest_command(args: argparse.Namespace) -> int:
    from tlray.bench import ingest

    results = ingest.ingest(batch_size=args.batch_size)
    print(ingest.format_ingest(results))
    if args.json:
        print(ingest.ingest_json(results))
    return 0


def train_command(args: argparse.Namespace) -> int:
    from tlray.bench.train import train_benchmark
    from tlray.bench.train_report import format_train, train_json

    result = train_benchmark(
        backbone=args.backbone, weights=args.weights, image_size=args.image_size,
        data_size=args.data_size, batch_size=args.batch_size, steps=args.steps,
        epochs=args.epochs, warmup=args.warmup, workers=args.workers, threads=args.threads,
        device=args.device, overrides=overrides_from_args(args),
        notice_checks=args.notice_checks)
    print(format_train(result))
    if args.json:
        print(train_json(result))
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    from tlray.bench.sweep import (
        format_regret,
        format_sweep,
        regret_benchmark,
        sweep_benchmark,
        sweep_json,
    )

    overrides = overrides_from_args(args)
    if args.regret:
        regret = regret_benchmark(overrides, args.config, args.workdir)
        print(format_regret(regret))
        if args.json:
            print(json.dumps({**asdict(regret), "regret": regret.regret,
                              "test_regret": regret.test_regret}, indent=2))
        return 0
    result = sweep_benchmark(overrides, args.config, args.workdir, compare=args.compare)
    print(format_sweep(result))
    if args.json:
        print(sweep_json(result))
    return 0
