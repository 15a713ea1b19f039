"""`tlray predict MODEL SOURCE`: the model's pyfunc on a dataset, a Kaggle test.csv or images,
in this process or on a pool of model replicas on the Ray cluster."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict a dataset, a Kaggle test.csv or images with "
                                       "an MLflow model (e.g. models:/NAME@champion)")
    add_predict_options(p)


def add_predict_options(parser: argparse.ArgumentParser, engine: str = "auto") -> None:
    from tlray.serve.predict import ENGINES, FORMATS, MODEL_URI_HELP, RAY_FROM_IMAGES

    parser.add_argument("model", help=f"the model: {MODEL_URI_HELP}")
    parser.add_argument("source", help="prepared dataset directory, pixel CSV (Kaggle test.csv) "
                                       "or a directory holding one, image folder (flat or one "
                                       "sub-folder per class), .zip, or image file; folders, "
                                       "zips and datasets may be s3:// or gs:// URIs")
    parser.add_argument("--split", help="split of a prepared dataset (default: predict if "
                                        "present, else test)")
    parser.add_argument("--out", help="CSV to write (default ./submission.csv for the Kaggle "
                                      "format, ./predictions.csv otherwise), or a folder name "
                                      "ending in .parquet for Parquet shards; a path or URI")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="kaggle: ImageId,Label; probs: id,class,prob_<class>...; auto "
                             "(default): kaggle for a test.csv or a Kaggle dataset's predict "
                             "split, else probs")
    parser.add_argument("--batch-size", type=int, default=256, help="images per call of the "
                                                                    "model (default 256)")
    parser.add_argument("--engine", choices=ENGINES, default=engine,
                        help=f"where to score: local (this process), ray (a pool of model "
                             f"replicas on the Ray cluster) or auto (ray from "
                             f"{RAY_FROM_IMAGES.said()}); default {engine}")
    parser.add_argument("--replicas", type=int, help="model replicas on Ray (default: the "
                                                     "cluster's CPUs / --cpus-per-replica, or "
                                                     "its GPUs with --gpu)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0,
                        help="CPUs each replica reserves (default 1)")
    parser.add_argument("--gpu", action="store_true", help="run the model on a GPU (one per "
                                                           "replica on Ray)")
    parser.set_defaults(run=predict_command)


def predict_command(args: argparse.Namespace) -> int:
    from tlray.serve.predict import predict
    from tlray.train.cluster import init_ray

    predict(args.model, args.source, split=args.split, out=args.out,
            batch_size=args.batch_size, format=args.format, verbose=True, engine=args.engine,
            replicas=args.replicas, cpus_per_replica=args.cpus_per_replica, gpu=args.gpu,
            connect=init_ray, keep_table=False)
    return 0
