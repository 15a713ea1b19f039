"""The training-loop benchmark, at a tiny size: structure only, never timings."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from tlray.bench import train as bench_train

pytestmark = pytest.mark.ray


def test_synthetic_split_puts_whole_batches_into_train():
    images, labels, fractions = bench_train.synthetic_images(6400, 8)
    assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 3)
    assert sum(fractions.values()) == pytest.approx(1.0)
    per_class = np.bincount(labels)
    assert len(per_class) == bench_train.NUM_CLASSES and len(set(per_class)) == 1
    assert round(fractions["train"] * per_class[0]) * bench_train.NUM_CLASSES == 6400
    assert round(fractions["val"] * per_class[0]) >= 1


def test_tiny_benchmark_reports_both_sides(ray_cluster, tlray_home, tmp_path):
    result = bench_train.train_benchmark(
        backbone="test_efficientnet", weights="none", image_size=16, batch_size=8, steps=3,
        epochs=2, warmup=1, device="cpu", workdir=str(tmp_path))

    assert result.plain_img_s > 0 and result.tlray_img_s > 0
    assert result.ratio == pytest.approx(result.tlray_img_s / result.plain_img_s)
    assert len(result.tlray_epochs_img_s) == 2 and len(result.plain_passes_img_s) == 1
    assert result.tlray_img_s == result.tlray_epochs_img_s[1]  # the epoch after warm-up
    # The data path alone, timed on the same split: first pass and the best of the rest.
    assert len(result.ingest_passes_img_s) == 2 and result.ingest_img_s > 0
    assert result.ingest_img_s == result.ingest_passes_img_s[1]
    assert result.ingest_headroom == pytest.approx(result.ingest_img_s / result.tlray_img_s)
    assert result.threads >= 1 and result.workers == 1 and result.steps == 3
    assert (result.backbone, result.image_size, result.batch_size) == ("test_efficientnet",
                                                                       16, 8)
    table = bench_train.format_train(result)
    assert "plain img/s" in table and "test_efficientnet" in table and "ingest:" in table
    as_json = json.loads(bench_train.train_json(result))
    assert as_json["ratio"] == pytest.approx(result.ratio)
    assert as_json["ingest_headroom"] == pytest.approx(result.ingest_headroom)


def test_cli_arguments_set_the_runner():
    from tlray.cli import bench_commands
    from tlray.cli.settings import overrides_from_args

    parser = argparse.ArgumentParser()
    bench_commands.add_train_options(parser)
    args = parser.parse_args(["--backbone", "resnet18", "--image-size", "64", "--workers", "2",
                              "--threads", "1", "--set", "model.freeze=all", "--json",
                              "--train.amp", "false"])
    assert args.run is bench_commands.train_command
    assert (args.backbone, args.image_size, args.workers, args.threads) == ("resnet18", 64, 2, 1)
    assert overrides_from_args(args) == ["train.amp=false", "model.freeze=all"] and args.json
