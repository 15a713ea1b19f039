"""The training-loop benchmark, at a tiny size: structure only, never timings."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from tlray import config
from tlray.bench import plain_loop, train_report
from tlray.bench import train as bench_train

pytestmark = pytest.mark.ray


def test_synthetic_split_puts_whole_batches_into_train():
    images, labels, fractions = plain_loop.synthetic_images(6400, 8)
    assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 3)
    assert sum(fractions.values()) == pytest.approx(1.0)
    per_class = np.bincount(labels)
    assert len(per_class) == plain_loop.NUM_CLASSES and len(set(per_class)) == 1
    assert round(fractions["train"] * per_class[0]) * plain_loop.NUM_CLASSES == 6400
    assert round(fractions["val"] * per_class[0]) >= 1


def test_tiny_benchmark_times_both_sides_on_the_same_work(ray_cluster, tlray_home, tmp_path):
    result = bench_train.train_benchmark(
        backbone="test_efficientnet", weights="none", image_size=16, batch_size=8, steps=3,
        epochs=2, warmup=1, device="cpu", workdir=str(tmp_path))

    # Both sides ran: the plain loop one timed pass of 3 steps, tlray 2 epochs of 3 steps (its
    # train split holds exactly steps x batch rows), the ingest pass twice over that split.
    assert len(result.plain_passes_img_s) == 1 and len(result.tlray_epochs_img_s) == 2
    assert len(result.ingest_passes_img_s) == 2
    assert (result.steps, result.batch_size, result.workers) == (3, 8, 1)
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name(
            "tlray-bench-train").experiment_id])[0]
    assert run.data.params["model.backbone"] == "test_efficientnet"
    assert int(float(run.data.metrics["img_per_s"])) > 0
    # The report shows both figures and what each is.
    table = train_report.format_train(result)
    assert f"{result.plain_img_s:,.0f}" in table and f"{result.tlray_img_s:,.0f}" in table
    assert "plain: best of 1 passes of 3 steps" in table and "ingest:" in table
    assert json.loads(train_report.train_json(result))["plain_passes_img_s"] == \
        result.plain_passes_img_s


def test_both_sides_build_the_runs_model_for_a_schedule_and_a_zero_head(mnist):
    from tlray.train.protocol import WorkerArgs
    from tlray.train.worker_setup import setup_model

    cfg = config.load(None, ["--model.backbone=test_efficientnet", "--model.weights=none",
                             "--data.image_size=16", "--model.freeze=all:1,0@0.5",
                             "--model.head_init=zero", f"--data.dataset={mnist.uri}"])
    net, phase = plain_loop.plain_model(cfg, mnist, "cpu")
    run = setup_model(WorkerArgs(config=cfg, dataset=mnist, cache=None, run_id=None,
                                 tracking_uri=None), "cpu")
    mine, theirs = net.model.state_dict(), run.model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    trainable = {n for n, p in net.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in run.model.named_parameters() if p.requires_grad}
    # The schedule's first phase trains the head alone, and the head starts at zero.
    assert trainable == {"classifier.weight", "classifier.bias"}
    head = net.model.get_classifier()
    assert not head.weight.any() and not head.bias.any()
    assert {id(p) for g in phase.optimizer.param_groups for p in g["params"]} == \
        {id(p) for n, p in net.model.named_parameters() if n in trainable}


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
