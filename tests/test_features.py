"""The frozen-backbone feature cache: splitting models, exact gradients, the cache on disk, runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from tlray import config
from tlray.data.dataset import decode_images
from tlray.data.ingest import iter_image_batches, read_split
from tlray.data.prepare import prepare
from tlray.data.preprocess import to_model_input
from tlray.errors import TlrayError
from tlray.model import feature_cache as features
from tlray.model.build import build_model
from tlray.model.cut import cut_model
from tlray.model.freeze import freeze_groups, model_groups
from tlray.data.prepare import resolve_dataset
from tlray.train.plan import check_model, preflight
from tlray.train.run import train

CASES = [("tf_efficientnet_lite0", "packaged", "3", "blocks.1"),
         ("tf_efficientnet_lite0", "packaged", "all", "global_pool"),
         ("resnet18", "none", "2", "layer1"),
         ("resnet18", "none", "all", "global_pool"),
         ("scratch_cnn", "none", "2", "features.1"),
         ("scratch_cnn", "none", "all", "dense.0")]  # dense.1 is a dropout: not cacheable


def train_config(cfg):
    return train(preflight(cfg))


def _trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backbone,weights,freeze,cut", CASES)
def test_cached_and_uncached_training_give_the_same_gradients(backbone, weights, freeze, cut):
    torch.manual_seed(0)
    model, minfo = build_model(backbone, 10, in_chans=1, img_size=32, weights=weights,
                               freeze=freeze)
    model_cut = cut_model(model, minfo.data_config["input_size"])
    assert model_cut is not None and model_cut.after == cut
    # Every trainable parameter of the model is in the rest, and nothing else trains.
    rest_params = {id(p) for p in model_cut.rest.parameters() if p.requires_grad}
    assert rest_params == {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in model_cut.front.parameters())

    model.train()  # training mode: the front must still be deterministic
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    torch.manual_seed(1)  # the same dropout masks in the trainable part on both paths
    F.cross_entropy(model(x), y).backward()
    uncached = _trainable_grads(model)
    model.zero_grad()
    with torch.no_grad():
        cached_input = model_cut.front(x)
    torch.manual_seed(1)
    F.cross_entropy(model_cut.rest(cached_input), y).backward()
    cached = _trainable_grads(model)
    assert uncached.keys() == cached.keys() and len(cached) > 0
    for name in uncached:
        torch.testing.assert_close(cached[name], uncached[name], rtol=1e-5, atol=1e-6,
                                   msg=f"gradient of {name}")


def test_nothing_to_cache_without_frozen_groups_or_with_random_layers():
    model, _ = build_model("resnet18", 10, img_size=32, weights="none", freeze=0)
    assert cut_model(model, (3, 32, 32)) is None
    # Drop-path makes frozen blocks random in training mode: the cut stops before them.
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10, drop_path_rate=0.2)
    freeze_groups(model, [names for _, names in model_groups(model)[:4]])
    model_cut = cut_model(model, (3, 32, 32))
    # The first block's drop-path rate is 0 (timm scales it up with depth); blocks.1 has one.
    assert model_cut is not None and model_cut.after == "blocks.0"
    assert not any(getattr(m, "drop_prob", 0) for m in model_cut.front.modules())


def test_cache_key_follows_the_front_weights_and_input():
    model, minfo = build_model("resnet18", 10, img_size=32, weights="none", freeze=2)
    fake = type("Info", (), {"fingerprint": "abc"})()  # only the dataset's identity counts
    model_cut = cut_model(model, (3, 32, 32))
    key = features.cache_key(model_cut, fake, minfo.data_config, 32)
    assert features.cache_key(model_cut, fake, minfo.data_config, 32) == key
    assert features.cache_key(model_cut, fake, minfo.data_config, 64) != key
    original = model.conv1.weight.detach().clone()
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] += 1.0  # a frozen weight: the features change
    assert features.cache_key(model_cut, fake, minfo.data_config, 32) != key
    with torch.no_grad():
        model.conv1.weight.copy_(original)
        model.fc.weight.zero_()  # a trained weight: the cache stays valid
    assert features.cache_key(model_cut, fake, minfo.data_config, 32) == key


def test_cache_on_disk_holds_exactly_the_front_outputs(ray_cluster, few_digits, tmp_path,
                                                        monkeypatch):
    info = few_digits
    model, minfo = build_model("tf_efficientnet_lite0", 10, in_chans=1, img_size=32,
                               freeze="3")
    model_cut = cut_model(model, minfo.data_config["input_size"])
    mean, std = minfo.data_config["mean"], minfo.data_config["std"]
    uri = str(tmp_path / "cache")
    cache = features.build(model_cut, info, uri, mean=mean, std=std, size=32)
    assert cache.features["cut"] == "blocks.1" and cache.dtype == "float32"
    assert cache.image_shape == model_cut.shape == (24, 8, 8)
    assert {s: cache.splits[s].rows for s in cache.splits} == {
        s: info.splits[s].rows for s in ("train", "val")}
    assert not list(tmp_path.glob(".cache.tmp-*"))  # built aside, moved into place

    # Read back through Ray Data as training does; every row equals the front's output for
    # the image with the same id, bit for bit.
    source = {}
    for uri_ in info.shard_uris("val"):
        table = pq.read_table(uri_)
        for image, row_id in zip(decode_images(table.column("image"), info.image_shape),
                                 table.column("id").to_pylist()):
            source[row_id] = image
    seen = 0
    for batch, labels, ids in iter_image_batches(read_split(cache, "val"), cache.image_shape,
                                                 50, dtype=cache.dtype, with_ids=True):
        images = torch.from_numpy(np.stack([source[i] for i in ids]))
        with torch.no_grad():
            expected = model_cut.front.eval()(to_model_input(images, mean, std, (32, 32)))
        torch.testing.assert_close(batch, expected, rtol=1e-5, atol=1e-5)
        seen += len(ids)
    assert seen == info.splits["val"].rows

    # It is not a dataset of images to train on.
    with pytest.raises(TlrayError, match="is a feature cache of"):
        resolve_dataset(uri)

    # A second build finds the finished cache and leaves it alone.
    stamp = (Path(uri) / "dataset.json").stat().st_mtime_ns
    assert features.build(model_cut, info, uri, mean=mean, std=std, size=32).uri == uri
    assert (Path(uri) / "dataset.json").stat().st_mtime_ns == stamp

    # A build racing one that published first (it saw no cache when it started) keeps the
    # published cache in place, untouched, and removes its own copy.
    real_existing, calls = features.existing, []

    def not_yet_published(u):
        calls.append(u)
        return None if len(calls) == 1 else real_existing(u)

    monkeypatch.setattr(features, "existing", not_yet_published)
    assert features.build(model_cut, info, uri, mean=mean, std=std, size=32).uri == uri
    assert len(calls) == 2  # once at the start, once after the rename was refused
    assert (Path(uri) / "dataset.json").stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".cache.*"))


SMALL = ["--model.backbone=tf_efficientnet_lite0", "--data.image_size=32",
         "--data.batch_size=64", "--scaling.num_workers=1", "--scaling.cpus_per_worker=1",
         "--optim.lr=0.01", "--train.epochs=2", "--tracking.log_model=true",
         "--tracking.evaluate=never"]  # mlflow.models.evaluate: test_train and test_serving


def test_linear_probe_trains_from_the_cache_and_the_model_works_on_images(ray_cluster,
                                                                          tlray_home):
    info = prepare("builtin:mnist", progress=False)
    # Two DDP workers, each training on its own part of the cached rows.
    probe = SMALL + [f"--data.dataset={info.uri}", "--model.freeze=all", "--optim.lr=0.02",
                     "--scaling.num_workers=2", "--scaling.cpus_per_worker=0.5"]
    cfg = config.load(None, probe)
    result = train_config(cfg)
    run = MlflowClient().get_run(result.run_id)
    cache_uri = run.data.tags["feature_cache"]
    assert cache_uri.rsplit("/", 2)[-2] == "feature_cache"
    cache = json.loads((Path(cache_uri) / "dataset.json").read_text())
    assert cache["features"]["cut"] == "global_pool" and cache["shape"] == [1280]
    # A linear probe on ImageNet features learns digits well above chance in 2 epochs, and
    # the test split (evaluated on images by the whole model) agrees with validation.
    assert result.metrics["val_acc"] > 0.6
    assert abs(result.metrics["test_acc"] - result.metrics["val_acc"]) < 0.1

    # The logged model is the whole network: images in, the reported test accuracy out.
    import mlflow.pytorch

    logged = mlflow.pytorch.load_model(result.model_uri, device="cpu")
    from tlray.data.dataset import load_info

    data = load_info(info.uri)
    _, minfo = check_model(cfg, data)
    correct = total = 0
    for uri_ in data.shard_uris("test"):
        table = pq.read_table(uri_)
        images = torch.from_numpy(decode_images(table.column("image"), data.image_shape).copy())
        x = to_model_input(images, minfo.data_config["mean"], minfo.data_config["std"], (32, 32))
        with torch.no_grad():
            preds = logged(x).argmax(1).numpy()
        correct += int((preds == table.column("label").to_numpy()).sum())
        total += len(preds)
    assert correct / total == pytest.approx(result.metrics["test_acc"], abs=1e-9)

    # A second run with the same data, weights and freeze depth plans to read the cache as
    # it is (the plan builds a missing cache; this one it only finds).
    stamp = (Path(cache_uri) / "dataset.json").stat().st_mtime_ns
    again = preflight(config.load(None, probe + ["--optim.lr=0.05"]))
    assert again.cache.uri == cache_uri and again.cache.trains_on_cache
    assert (Path(cache_uri) / "dataset.json").stat().st_mtime_ns == stamp


def test_the_plan_decides_whether_a_run_reads_the_cache_and_says_why(ray_cluster, tlray_home,
                                                                     mnist):
    base = SMALL + [f"--data.dataset={mnist.uri}", "--model.freeze=all", "--train.epochs=1",
                    "--tracking.log_model=false"]
    plan = lambda *more: preflight(config.load(None, [*base, *more]))  # noqa: E731
    caches = Path(tlray_home) / "ray_results" / "feature_cache"

    never = plan("--train.feature_cache=never")
    assert never.cache is None and never.cache_note == "not used (train.feature_cache=never)"
    # Augmented training images change every epoch: only validation could read a cache,
    # and auto does not build one for that alone...
    auto = plan("--data.augment=digits", "--train.feature_cache=auto")
    assert auto.cache is None
    assert auto.cache_note.startswith("not used: training images are augmented")
    assert not caches.exists()
    # ...always does (in a Ray task with a worker's resources), for validation only.
    always = plan("--data.augment=digits", "--train.feature_cache=always")
    assert always.cache.splits == ("val",) and not always.cache.trains_on_cache
    assert always.cache_note.startswith("validation only")
    assert always.cache.uri.startswith(str(caches))


def test_sweep_benchmark_times_both_sides_of_the_same_sweep(ray_cluster, few_digits,
                                                           tmp_path):
    from tlray.bench import sweep as bench_sweep

    info = few_digits
    result = bench_sweep.sweep_benchmark(
        ["--model.backbone=test_efficientnet", "--model.weights=none", "--data.image_size=32",
         f"--data.dataset={info.uri}", "--train.epochs=1", "--tune.num_samples=2",
         "--tune.freeze=all", "--tune.grace_period=1", "--scaling.cpus_per_worker=0.5",
         "--tracking.log_model=false", "--data.augment=none"], workdir=str(tmp_path))
    assert list(result.sides) == ["auto", "never"]
    assert result.setting == "train.feature_cache" and result.baseline.value == "never"
    for side in result.sides.values():
        assert side.trials == 2 and side.best_metric is not None
        assert set(side.seconds_by_freeze) == set(side.epoch_seconds_by_freeze) == {"all"}
    # Only the cached side wrote a cache, inside its own storage.
    assert list((tmp_path / "auto" / "feature_cache").iterdir())
    assert not (tmp_path / "never" / "feature_cache").exists()
    # The seeded search sampled the same learning rates on both sides.
    runs = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("tlray-benchmark-sweep").experiment_id])
    lrs = {}
    for run in (r for r in runs if "mlflow.parentRunId" in r.data.tags):  # the trials
        lrs.setdefault(run.data.tags["feature_cache"].startswith("not used"), set()).add(
            run.data.params["optim.lr"])
    assert lrs[True] == lrs[False] and len(lrs[True]) == 2
    text = bench_sweep.format_sweep(result)
    assert "whole sweep" in text and "all:" in text
    for side in result.sides.values():  # both sides' figures are in the report
        assert f"{side.wall_s:.1f}" in text
    assert set(json.loads(bench_sweep.sweep_json(result))["sides"]) == {"auto", "never"}


@pytest.mark.parametrize("spec, message", [
    ("train.feature_cache=auto", "two different values"),
    ("train.feature_cache=auto,auto", "two different values"),
    ("tune.trials_per_gpu=4,one", "tune.trials_per_gpu"),
    ("tune.trials_per_gpus=4,1", "unknown setting"),
    ("train.feature_cache=never,auto", "data.augment=none"),  # the preset augments
])
def test_sweep_benchmark_refuses_a_bad_comparison(spec, message):
    from tlray.bench import sweep as bench_sweep
    from tlray.errors import TlrayError

    assert bench_sweep.parse_compare("tune.trials_per_gpu=4,1") == (
        "tune.trials_per_gpu", ["4", "1"])
    with pytest.raises(TlrayError, match=message):
        bench_sweep.sweep_benchmark(compare=spec)  # refused before anything runs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cache_built_on_the_gpu_matches_the_cpu(tlray_home, tmp_path):
    info = prepare("builtin:mnist", progress=False)
    model, minfo = build_model("tf_efficientnet_lite0", 10, in_chans=1, img_size=64,
                               freeze="all")
    model_cut = cut_model(model, minfo.data_config["input_size"])
    kwargs = dict(mean=minfo.data_config["mean"], std=minfo.data_config["std"], size=64)
    cpu = features.build(model_cut, info, str(tmp_path / "cpu"), **kwargs)
    gpu = features.build(model_cut, info, str(tmp_path / "gpu"), device="cuda", amp=True, **kwargs)
    for a, b in zip(cpu.shard_uris("val"), gpu.shard_uris("val")):
        x = decode_images(pq.read_table(a).column("image"), cpu.image_shape, cpu.dtype)
        y = decode_images(pq.read_table(b).column("image"), gpu.image_shape, gpu.dtype)
        np.testing.assert_allclose(y, x, rtol=0.05, atol=0.05)  # bf16 autocast on the GPU
