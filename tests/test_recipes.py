"""Fine-tuning recipes: freeze schedules (their first phase from the feature cache), one build
per cache, the learning-rate range test, weight averaging and test-time augmentation."""

from __future__ import annotations

import glob
import json
import multiprocessing
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from lock_holders import hold_the_lock, wait_for_the_lock
from tlray import config
from tlray.config.schedule import Phase
from tlray.data.dataset import sample_per_class
from tlray.data.preprocess import to_model_input, tta_probabilities
from tlray.model.build import build_model
from tlray.model.freeze import model_groups
from tlray.train.feeds import TrainFeed
from tlray.train.lr_find import START, find_and_log
from tlray.train.phases import enter_phase
from tlray.train.steps import train_step
from tlray.train.worker_setup import RunModel
from tlray.train.plan import preflight
from tlray.train.run import train

SMALL = ["--model.backbone=test_efficientnet", "--model.weights=none", "--data.image_size=32",
         "--scaling.num_workers=1", "--scaling.cpus_per_worker=1",
         "--scaling.borrow_idle_cpus=false", "--tracking.evaluate=never"]


# --------------------------------------------------------------------------- one build


WAIT_S = 300  # a bound, not a pause: each wait ends on its event (slow on a loaded machine)


def test_one_build_per_cache_and_a_dead_build_blocks_nobody(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    uri = str(tmp_path / "feature_cache" / "abc")
    held, release, waiting, got = (ctx.Event() for _ in range(4))
    first = ctx.Process(target=hold_the_lock, args=(uri, held, release, False))
    first.start()
    assert held.wait(WAIT_S)
    second = ctx.Process(target=wait_for_the_lock, args=(uri, waiting, got))
    second.start()
    assert waiting.wait(WAIT_S)  # the second build waits for the first...
    assert not got.is_set()
    release.set()
    assert got.wait(WAIT_S)  # ...and goes on once it is done
    first.join(WAIT_S), second.join(WAIT_S)

    held, waiting, got = ctx.Event(), ctx.Event(), ctx.Event()
    dying = ctx.Process(target=hold_the_lock, args=(uri, held, None, True))
    dying.start()
    dying.join(WAIT_S)
    assert held.is_set() and dying.exitcode == 1
    after = ctx.Process(target=wait_for_the_lock, args=(uri, waiting, got))
    after.start()
    assert got.wait(WAIT_S)  # the dead build's lock went with it
    after.join(WAIT_S)


# --------------------------------------------------------------------------- schedules


def test_a_phase_boundary_unfreezes_the_next_groups_and_leaves_the_rest_frozen():
    torch.manual_seed(0)
    model, minfo = build_model("test_efficientnet", 3, in_chans=1, img_size=16, weights="none")
    groups = [names for _, names in model_groups(model)]
    net = RunModel(model, minfo, None, groups)
    cfg = config.load(None, ["--model.freeze=all:1,2@0.5", "--train.epochs=3",
                             "--train.channels_last=false"])
    args = type("Args", (), {"config": cfg, "cache": None})()
    phases = [Phase("all", 1), Phase("2", None, 0.5)]
    first = enter_phase(0, phases, net, args, lambda m: m, steps_per_epoch=2, first_step=0,
                        world=1)
    head_only = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_bn = {n: b.clone() for n, b in model.named_buffers() if "running_mean" in n}
    second = enter_phase(1, phases, net, args, lambda m: m, steps_per_epoch=2, first_step=2,
                         world=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert head_only < trainable
    assert trainable == {n for group in groups[2:] for n in group} | head_only
    assert second.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr * 0.5,
                                                                   rel=0.02)
    assert first.optimizer is not second.optimizer

    x = torch.rand(8, 16, 16, 1).mul(255).to(torch.uint8)
    feed = TrainFeed(lambda b: b.permute(0, 3, 1, 2).float() / 255, None, seed=0, epoch=1,
                     rank=0)
    model.train()
    for step in (3, 4):
        feed.seed_step(step)
        train_step(x, torch.arange(8) % 3, step - second.first_step, forward=second.forward,
                   criterion=torch.nn.CrossEntropyLoss(), optimizer=second.optimizer,
                   scheduler=second.scheduler, amp=torch.autocast("cuda", enabled=False),
                   feed=feed)
    after = dict(model.named_buffers())
    for name, before in frozen_bn.items():
        group = next(i for i, g in enumerate(groups) if any(n.startswith(
            name.rsplit(".", 1)[0]) for n in g))
        moved = not torch.equal(after[name], before)
        assert moved == (group >= 2), name  # live BatchNorm learns, frozen stays



def run(data, *extra):
    return train(preflight(config.load(None, [*SMALL, f"--data.dataset={data.uri}",
                                              *extra])))


def checkpoints(result) -> dict[int, Path]:
    """The run's training checkpoints, by epoch."""
    out = {}
    for d in glob.glob(f"{Path(result.checkpoint_path).parent}/checkpoint_*/"):
        state = json.loads((Path(d) / "state.json").read_text())
        if not state["trained"]:
            out[state["epoch"]] = Path(d)
    return out


def test_a_schedule_from_the_cache_averaged_and_tested_with_tta_is_what_is_logged(
        ray_cluster, few_digits):
    # Through Ray: the first phase reads the feature cache, the second the images; the
    # weight average is what is kept, tested and logged; test-time augmentation is measured
    # and served. (That the cache trains as the images would, and that such a run resumes
    # exactly in phase 2, are the loop's properties: test_loop.py.)
    cached = run(few_digits, "--model.freeze=all:1,2@0.5", "--train.epochs=2", "--train.ema=0.9",
                 "--model.tta=flip", "--train.keep_checkpoints=3", "--optim.lr=0.01",
                 "--train.feature_cache=always")
    client = MlflowClient()
    tags = client.get_run(cached.run_id).data.tags
    assert tags["feature_cache"].startswith(str(few_digits.uri).split("/datasets/")[0])
    phases = {m.step: m.value for m in client.get_metric_history(cached.run_id, "phase")}
    assert phases == {1: 0, 2: 1}

    # The averaged weights are what is kept as best, tested and logged.
    ckpt = checkpoints(cached)[cached.report.best_epoch]
    best = torch.load(Path(cached.checkpoint_path) / "model.pt", weights_only=True)
    raw = torch.load(ckpt / "model.pt", weights_only=True)
    averaged = torch.load(ckpt / "ema.pt", weights_only=True)
    assert any(not torch.equal(best[k], raw[k]) for k in best)
    assert all(torch.equal(best[k], averaged[k]) for k in best)
    logged = mlflow.pytorch.load_model(cached.model_uri, device="cpu").state_dict()
    shared = [k for k in best if k in logged]
    assert len(shared) > len(best) // 2
    assert all(torch.equal(logged[k], best[k]) for k in shared)

    # Test-time augmentation: its cost and what it buys are logged; the served model
    # averages the same views.
    metrics = client.get_run(cached.run_id).data.metrics
    assert {"test_acc_without_tta", "test_ms_per_image_without_tta"} <= set(metrics)
    served = mlflow.pyfunc.load_model(cached.model_uri)
    pre = served.metadata.metadata["preprocess"]
    assert pre["tta"] == "flip"
    images, _ = sample_per_class(few_digits, "test", per_class=1)
    x = to_model_input(torch.from_numpy(images.copy()), pre["mean"], pre["std"], pre["size"])
    network = mlflow.pytorch.load_model(cached.model_uri, device="cpu")
    with torch.no_grad():
        expected = (torch.softmax(network(x), 1) + torch.softmax(network(x.flip(-1)), 1)) / 2
    got = served.predict(images[..., 0]).filter(like="prob_").to_numpy()
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


# --------------------------------------------------------------------------- lr-find


def test_lr_find_suggests_a_rate_inside_its_ramp_and_logs_the_plot(ray_cluster, few_digits):
    out = find_and_log(config.load(None, [*SMALL, f"--data.dataset={few_digits.uri}",
                                          "--tune.freeze=0,all"]))
    run_id = out.rsplit("MLflow run ", 1)[1].split()[0]
    logged = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/lr_find.json"))
    assert [c["freeze"] for c in logged] == ["0", "all"]
    for curve in logged:
        assert START <= curve["suggestion"] <= curve["lrs"][-1]
        assert len(curve["lrs"]) == len(curve["losses"]) > 10
    plots = {a.path for a in MlflowClient().list_artifacts(run_id, "plots")}
    assert plots == {"plots/lr_find.png"}
    assert "a sweep's range" in out


def test_a_sweep_with_auto_rates_searches_around_the_range_tests_suggestion(ray_cluster,
                                                                          few_digits):
    from tlray.tune import sweep

    cfg = config.load(None, [*SMALL, f"--data.dataset={few_digits.uri}", "--train.epochs=2",
                             "--tune.freeze=all:1,0@0.5", "--tune.num_samples=2",
                             "--tune.lr_min=auto", "--tune.lr_max=auto",
                             "--tune.max_concurrent=2", "--tune.registered_name=auto-lr"])
    outcome = sweep.sweep(cfg)
    parent = MlflowClient().get_run(outcome.parent_run_id)
    (curve,) = json.loads(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/"
                                                     f"lr_find.json"))
    assert curve["freeze"] == "all"  # the schedule's first phase
    suggestion = curve["suggestion"]
    rates = [t["optim.lr"] for t in outcome.trials]
    assert len(rates) == 2
    assert all(suggestion / 3 * 0.9999 <= r <= suggestion * 3 * 1.0001 for r in rates), rates
    plots = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "plots")}
    assert "plots/lr_find.png" in plots


# --------------------------------------------------------------------------- tta


def test_tta_of_a_symmetric_input_is_no_tta_and_averages_the_views():
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(),
                                  torch.nn.LazyLinear(3)).eval()
    half = torch.rand(2, 1, 8, 4)
    mirror = torch.cat([half, half.flip(-1)], dim=-1)  # left-right symmetric
    quad = torch.rand(2, 1, 4, 4)
    square = torch.cat([torch.cat([quad, quad.flip(-1)], -1),
                        torch.cat([quad.flip(-2), quad.flip(-1).flip(-2)], -1)], -2)
    square = (square + square.transpose(-1, -2)) / 2  # every flip and quarter turn alike
    with torch.no_grad():
        plain = tta_probabilities(network, mirror, "none")
        torch.testing.assert_close(tta_probabilities(network, mirror, "flip"), plain)
        torch.testing.assert_close(tta_probabilities(network, square, "dihedral"),
                                   tta_probabilities(network, square, "none"))
        x = torch.rand(2, 1, 8, 8)
        both = (torch.softmax(network(x), 1) + torch.softmax(network(x.flip(-1)), 1)) / 2
        torch.testing.assert_close(tta_probabilities(network, x, "flip"), both)
    assert np.isfinite(plain.numpy()).all()
