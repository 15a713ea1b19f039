"""`tlray predict MODEL SOURCE`: the model's pyfunc on a dataset, a Kaggle test.csv or images."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict a dataset, a Kaggle test.csv or images with "
                                       "an MLflow model (e.g. models:/NAME@champion)")
    add_predict_options(p)


def add_predict_options(parser: argparse.ArgumentParser) -> None:
    from tlray.serve.predict import FORMATS, MODEL_URI_HELP

    parser.add_argument("model", help=f"the model: {MODEL_URI_HELP}")
    parser.add_argument("source", help="prepared dataset directory, pixel CSV (Kaggle test.csv) "
                                       "or a directory holding one, image folder (flat or one "
                                       "sub-folder per class), .zip, or image file")
    parser.add_argument("--split", help="split of a prepared dataset (default: predict if "
                                        "present, else test)")
    parser.add_argument("--out", help="CSV to write (default ./submission.csv for the Kaggle "
                                      "format, ./predictions.csv otherwise)")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="kaggle: ImageId,Label; probs: id,class,prob_<class>...; auto "
                             "(default): kaggle for a test.csv or a Kaggle dataset's predict "
                             "split, else probs")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass "
                                                                    "(default 256)")
    parser.set_defaults(run=predict_command)


def predict_command(args: argparse.Namespace) -> int:
    from tlray.serve.predict import predict

    predict(args.model, args.source, split=args.split, out=args.out,
            batch_size=args.batch_size, format=args.format, verbose=True)
    return 0
