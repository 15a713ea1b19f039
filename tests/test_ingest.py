"""Ray Data ingest: shards to torch batches, split across real Train workers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
import torch

from tlray.data.pixel_sources import from_arrays
from tlray.data.dataset import read_shard
from tlray.data.ingest import worker_split_config, iter_image_batches, read_split
from tlray.data.prepare import prepare
from tlray.data.preprocess import to_model_input

pytestmark = pytest.mark.ray
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/


def collect_ids(cfg):
    """A Train worker that records which rows of each dataset it saw, epoch by epoch."""
    import ray.train

    ctx = ray.train.get_context()
    seen = {}
    for name in cfg["names"]:
        shard = ray.train.get_dataset_shard(name)
        seen[name] = []
        for _ in range(cfg["epochs"]):
            ids, sizes = [], []
            for images, labels, batch_ids in iter_image_batches(shard, cfg["shape"], 7,
                                                                shuffle=torch.Generator(),
                                                                with_ids=True):
                assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == cfg["shape"]
                assert labels.dtype == torch.int64 and len(labels) == len(images)
                ids += batch_ids
                sizes.append(len(batch_ids))
            assert all(size == 7 for size in sizes[:-1]) and 0 < sizes[-1] <= 7
            seen[name].append(ids)
    Path(cfg["out"], f"rank{ctx.get_world_rank()}.json").write_text(json.dumps(seen))


@pytest.mark.timeout(300)  # a deal that waits for a CPU waits for good
def test_two_workers_split_every_row_once_lockstep_ones_evenly_and_held_ones_the_same_again(
        ray_cluster, tmp_path):
    """Four ways to deal one dataset to two real Train workers, in one run:
    - `every` (validation, test): every row exactly once per epoch, streamed or (`every_held`)
      held in memory and dealt by position, in parts at most a row apart;
    - `held` and `streamed` in lockstep (training): every worker as many rows, so the same
      steps, at most workers - 1 rows of an epoch left out;
    - `held` (in memory) is dealt by position: a restarted run with as many workers gives
      every worker the same rows again.
    The workers leave less than a whole CPU free, as two on a 2-core laptop do: dealing
    must not wait for one (Ray Data's own `split` did, for good).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    rng = np.random.default_rng(0)
    n = 203  # not a multiple of the batch size or of the worker count
    info = prepare(from_arrays(rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8),
                               np.arange(n) % 3), tmp_path / "ds", fractions={"train": 1.0},
                   rows_per_shard=20, progress=False)

    # Half a CPU left: for Ray Data's read tasks (a quarter each), not for a whole-CPU task.
    cpus = (ray.available_resources()["CPU"] - 0.5) / 2

    def run(out: Path, names: list[str]) -> list[dict]:
        datasets = {"every": lambda: read_split(info, "train", shuffle=True),
                    "every_held": lambda: read_split(info, "train", cache=True),
                    "held": lambda: read_split(info, "train", shuffle=True, seed=3, cache=True),
                    "streamed": lambda: read_split(info, "train", shuffle=True, seed=3)}
        out.mkdir()
        TorchTrainer(
            collect_ids, train_loop_config={"epochs": 2, "shape": info.image_shape,
                                            "out": str(out), "names": names},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": cpus}),
            run_config=RunConfig(storage_path=str(tmp_path / "ray")),
            datasets={name: datasets[name]() for name in names},
            dataset_config=worker_split_config(lockstep=["held", "streamed"],
                                               in_memory=["held", "every_held"])).fit()
        return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    first = run(tmp_path / "run0", ["every", "every_held", "held", "streamed"])
    every_row = {f"arrays:{i}" for i in range(n)}
    for name in ("every", "every_held"):
        for a, b in zip(first[0][name], first[1][name]):  # each epoch
            assert len(a) > 0 and len(b) > 0
            assert not set(a) & set(b)  # disjoint
            assert len(a) + len(b) == n and set(a) | set(b) == every_row  # complete, once
    assert [len(ids) for rank in first for ids in rank["every_held"]] == [n // 2] * 2 + \
        [n - n // 2] * 2  # by position: a row apart, the same every epoch
    for name in ("held", "streamed"):
        for a, b in zip(first[0][name], first[1][name]):
            assert len(a) == len(b) == n // 2 and not set(a) & set(b), name
    again = run(tmp_path / "run1", ["held"])
    assert [sorted(ids) for rank in first for ids in rank["held"]] == \
        [sorted(ids) for rank in again for ids in rank["held"]]


@pytest.mark.parametrize("cache,shuffle,local", [(False, False, False), (True, False, True),
                                                  (True, True, True), (True, False, False)])
def test_read_split_batches_match_shards(ray_cluster, tmp_path, monkeypatch, cache, shuffle,
                                         local):
    # local: a small cached split is read by this process; otherwise by Ray Data's tasks.
    import tlray.data.ingest

    monkeypatch.setattr(tlray.data.ingest, "LOCAL_READ_BYTES", 2**30 if local else 0)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (50, 5, 4, 1), dtype=np.uint8)
    info = prepare(from_arrays(images, np.arange(50) % 2), tmp_path / "ds",
                   fractions={"train": 1.0}, rows_per_shard=8, progress=False)
    got, sizes = {}, []
    dataset = read_split(info, "train", shuffle=True, cache=cache)
    for x, y, ids in iter_image_batches(dataset, info.image_shape, 16,
                                        shuffle=torch.Generator() if shuffle else None,
                                        with_ids=True):
        sizes.append(len(ids))
        for image, label, row in zip(x.numpy(), y.numpy(), ids):
            got[int(row.split(":")[1])] = (image, label)
    assert sizes == [16, 16, 16, 2]  # whole batches across shard ends, the rest last
    assert sorted(got) == list(range(50))
    if cache:  # one block per shard, in shard order (what a seeded run relies on)
        blocks = read_split(info, "train", cache=True).iter_batches(batch_size=None,
                                                                    batch_format="pyarrow")
        assert [b.column("id").to_pylist() for b in blocks] == [
            read_shard(uri).column("id").to_pylist() for uri in info.shard_uris("train")]
    for i, (image, label) in got.items():
        np.testing.assert_array_equal(image, images[i])
        assert label == i % 2


def test_rebatch_cuts_exact_batches_and_shuffles_across_blocks():
    import pyarrow as pa

    from tlray.data.ingest import rebatch

    blocks = [pa.table({"id": list(range(start, stop))})
              for start, stop in ((0, 5), (5, 6), (6, 17), (17, 23))]

    def ids(shuffle, seed=0):
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        batches = list(rebatch(iter(blocks), 4, shuffle=generator))
        assert [b.num_rows for b in batches] == [4, 4, 4, 4, 4, 3]
        return [i for b in batches for i in b.column("id").to_pylist()]

    assert ids(shuffle=False) == list(range(23))  # in order, across block ends
    shuffled = ids(shuffle=True)
    assert sorted(shuffled) == list(range(23)) and shuffled != list(range(23))
    assert ids(shuffle=True) == shuffled  # the seed decides the order
    assert ids(shuffle=True, seed=1) != shuffled


def test_to_model_input_resizes_and_normalises():
    images = torch.full((3, 28, 28, 1), 255, dtype=torch.uint8)
    x = to_model_input(images, mean=(0.5,), std=(0.25,), size=(32, 32))
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.full_like(x, 2.0))
    rgb = to_model_input(torch.zeros((2, 8, 8, 3), dtype=torch.uint8), (0.5, 0.5, 0.5),
                         (0.5, 0.5, 0.5), size=(8, 8), channels_last=True)
    assert rgb.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(rgb, torch.full_like(rgb, -1.0))


def read_and_iterate(info, batch_size):
    """In a placement group that holds every CPU of the cluster, as sweep trials can."""
    ds = read_split(info, "train", cache=True).randomize_block_order(seed=0)
    return sum(len(labels) for _, labels in iter_image_batches(ds, info.image_shape,
                                                                batch_size,
                                                                shuffle=torch.Generator()))


def test_a_small_cached_split_needs_no_free_cpu(ray_cluster, tmp_path):
    rng = np.random.default_rng(0)
    info = prepare(from_arrays(rng.integers(0, 256, (90, 6, 6, 1), dtype=np.uint8),
                               np.arange(90) % 3), str(tmp_path / "ds"), progress=False)
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    everything = ray.cluster_resources()["CPU"]
    group = placement_group([{"CPU": everything}])
    ray.get(group.ready(), timeout=60)
    task = ray.remote(read_and_iterate).options(
        num_cpus=everything, scheduling_strategy=PlacementGroupSchedulingStrategy(group))
    try:
        # A read that started Ray tasks of its own would wait for a free CPU forever.
        assert ray.get(task.remote(info, 8), timeout=120) == info.splits["train"].rows
    finally:
        remove_placement_group(group)


@pytest.mark.parametrize("shuffle", [False, True])
def test_training_blocks_come_in_shard_order_unless_shuffled(ray_cluster, tmp_path, shuffle):
    import types

    from tlray import config
    from tlray.train.launch import run_datasets

    rng = np.random.default_rng(3)
    info = prepare(from_arrays(rng.integers(0, 256, (120, 4, 4, 1), dtype=np.uint8),
                               np.arange(120) % 3), tmp_path / "ds", rows_per_shard=10,
                   fractions={"train": 0.8, "val": 0.1, "test": 0.1}, progress=False)
    cfg = config.load(None, [f"--data.dataset={info.uri}", f"--data.shuffle={shuffle}"])
    plan = types.SimpleNamespace(config=cfg, cache=None, dataset=info)
    datasets, _ = run_datasets(plan)
    shard_order = [i for uri in info.shard_uris("train")
                   for i in read_shard(uri).column("id").to_pylist()]
    epochs = [[i for block in datasets["train"].iter_batches(batch_size=None,
                                                               batch_format="pyarrow")
               for i in block.column("id").to_pylist()] for _ in range(2)]
    assert epochs[0] == epochs[1]  # the same order every epoch
    assert sorted(epochs[0]) == sorted(shard_order)
    assert (epochs[0] == shard_order) == (not shuffle)
