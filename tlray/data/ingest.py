"""From a prepared dataset to torch batches on each Train worker, through Ray Data.

The pipeline is deliberately thin: `read_parquet` streams the shards, each worker gets its
own disjoint part of the stream (`streaming_split`), and batches arrive on the worker as
Arrow tables whose `image` column is turned into a uint8 NHWC tensor without a copy.
Everything that costs arithmetic (uint8 -> float, resize to the model's input size,
normalisation) happens afterwards on whole batches, on the training device, in
`tlray.data.preprocess.to_model_input`: moving uint8 is 4x cheaper than float32, and a GPU does
that work for free.

Batch layout handed to the training loop: `images` uint8 [N, H, W, C] (C = 1 grey or 3 RGB,
as in dataset.json), `labels` int64 [N] (index into dataset.json's classes, -1 unlabelled).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable
from typing import Iterator

import pyarrow as pa
import torch

from tlray.data.dataset import DatasetInfo, decode_images, read_shard, read_shards

# Ray Data's own tasks need a slice of a CPU; on a 2-core laptop whole CPUs would all be
# held by Train workers and the read task would wait forever (see FIELD_NOTES).
READ_NUM_CPUS = 0.25
# A cached split up to this size is read by the calling process itself and put into the
# object store as one block per shard: a few pyarrow reads take milliseconds, where a Ray
# Data execution with one task per shard took 1-8 s (a cold cluster starts worker processes).
# No Ray task runs for it at all (`ray.data.from_blocks`; `from_arrow` starts one 1-CPU task
# per table for its metadata, which waits forever when the reader's own trials hold the CPUs).
LOCAL_READ_BYTES = 256 * 2**20


def read_split(info: DatasetInfo, split: str, *, shuffle: bool = False,
               seed: int | None = None, cache: bool = False):
    """A Ray Dataset over one split's shards (columns image, label, id), one block per shard.

    Each shard is read by one Ray task with `pyarrow.parquet.read_table`. On this project's
    shards that is 5-10x faster than `ray.data.read_parquet`, whose generic read path
    (file listing, row-group slicing) dominated the time and added seconds to every epoch.

    Args:
        shuffle: randomise the order of shards (rows inside each shard were already shuffled
            when the dataset was prepared); `iter_image_batches(shuffle=True)` mixes rows.
        seed: fixes the shard order; None draws a new order each time the dataset is read.
        cache: read the shards once, now, into Ray's object store; every epoch then streams
            from memory instead of re-reading Parquet (the first epoch of a run, and every
            epoch of a small dataset, is otherwise dominated by starting the read tasks).
    """
    import ray.data

    shards = info.shard_uris(split)
    if cache and info.split_bytes(split) <= LOCAL_READ_BYTES:
        ds = ray.data.from_blocks([read_shard(uri) for uri in shards])  # in shard order
    else:
        ds = ray.data.from_items([{"path": p} for p in shards], override_num_blocks=len(shards))
        ds = ds.map_batches(read_shards, batch_size=1, batch_format="pyarrow",
                            zero_copy_batch=True, num_cpus=READ_NUM_CPUS,
                            compute=ray.data.TaskPoolStrategy(size=read_tasks(len(shards))))
        if cache:
            # Blocks in shard order, not in the order the read tasks happened to finish: with
            # a seed, the same run sees the same batches.
            ds.context.execution_options.preserve_order = True
            ds = ds.materialize()
    return ds.randomize_block_order(seed=seed) if shuffle else ds


def read_tasks(shards: int) -> int:
    """How many shard reads run at once: about one per two of the cluster's CPUs, at least 2.

    A read is a file read and an unzip; what costs is its process: each task that runs
    beside another needs a Ray worker process of its own, and a new one spends ~2 s of CPU
    importing before it reads anything. Left to Ray Data (a quarter-CPU task per free
    quarter CPU), a 4-CPU local cluster started 11 of them to read 11 tiny shards.
    """
    import ray

    cpus = ray.cluster_resources().get("CPU", 2.0)
    return max(1, min(shards, max(2, int(cpus // 2))))


def worker_split_config(lockstep: Iterable[str] = (), in_memory: Iterable[str] = ()):
    """A Train DataConfig that splits each dataset across the workers.

    - By default every row exactly once per epoch, in parts that may differ by a batch or
      two (DDP's `join()` covers the last batches): validation and test.
    - In lockstep (datasets in `lockstep`: the training split): every worker gets as many
      rows, so all of them reach every step together and a check across workers at a step
      (a preemption notice, a mid-epoch checkpoint) is safe; at most workers - 1 rows of
      an epoch are left out.
    - One worker reads the whole dataset itself: no split, no coordinator actor.
    - Dealt by position (`in_memory`: datasets already in Ray's object store): a run
      restarted with as many workers gives each the same rows, so it can resume inside an
      epoch exactly; and no coordinator actor (a process, ~2 s of CPU to start) is needed.
      Streamed ones are dealt as workers ask.
    """
    from ray.train import DataConfig

    lockstep, in_memory = set(lockstep), set(in_memory)

    class WorkerSplitConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                with warnings.catch_warnings():
                    # Ray's own resolution sets a field it has deprecated (exclude_resources)
                    # and warns about itself on every run.
                    warnings.filterwarnings("ignore", message=".*exclude_resources")
                    ds.context.execution_options = self._resolve_execution_options(name)
                if ds.name is None:
                    ds.set_name(name)
                hints = worker_node_ids if self._enable_shard_locality else None
                equal = name in lockstep and world_size > 1
                if world_size == 1:  # the whole dataset, without a coordinator actor
                    parts = [ds.iterator()]
                elif name in in_memory:  # its blocks are already somewhere: no coordinator
                    parts = [p.iterator() for p in split_by_position(ds, world_size, equal)]
                else:
                    parts = ds.streaming_split(world_size, equal=equal, locality_hints=hints)
                for i, part in enumerate(parts):
                    output[i][name] = part
            return output

    return WorkerSplitConfig()


def split_by_position(ds, parts: int, equal: bool = False) -> list:
    """An in-memory dataset in `parts` pieces by position, each a run of consecutive rows:
    `equal`, each `rows // parts` rows (the rest left out); else every row in exactly one,
    their sizes at most a row apart.

    Done here, in the calling process (Train's DatasetManager), not by Ray Data's
    `split`/`split_at_indices`: those cut blocks in tasks that each need a whole free CPU,
    and while the run's workers hold a 2-core laptop's CPUs they wait forever (seen: a
    2-worker sweep trial on `ray.init()`'s 2 CPUs). The pieces are new blocks in the object
    store (a copy of the split for the run's length; in-memory splits are at most
    `data.cache_gb`), in the split's own block sizes.
    """
    import ray

    blocks = ray.get(ds.to_arrow_refs())  # no task: the blocks are Arrow tables already
    table = pa.concat_tables(blocks) if blocks else ds.schema().base_schema.empty_table()
    rows = table.num_rows
    size = rows // parts
    bounds = [size * i if equal else rows * i // parts for i in range(parts + 1)]
    return [ray.data.from_blocks([pa.Table.from_batches([b]) for b in
                                  table.slice(start, stop - start).to_batches()]
                                 or [table.slice(0, 0)])
            for start, stop in zip(bounds, bounds[1:])]


def iter_image_batches(data, shape: tuple[int, ...], batch_size: int, *,
                       dtype: str = "uint8", device: torch.device | str = "cpu",
                       shuffle: torch.Generator | None = None, prefetch_batches: int = 2,
                       with_ids: bool = False, skip: int = 0
                       ) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yields (images uint8 [N,H,W,C], labels int64 [N]) from a Ray Dataset or DataIterator.

    From a feature cache (`dtype` float32) the first tensor is [N, *shape] activations.

    Ray hands over whole blocks (one per shard; `prefetch_batches` blocks read ahead) and
    they are cut into batches here, by zero-copy slicing (see `rebatch`): Ray's own batching
    thread costs ~0.2 ms per batch, more than a 28x28 batch takes to read. With a `shuffle`
    generator, rows come in the order it draws, within and across shards: a training
    epoch's generator is seeded by (seed, epoch, rank), so the order is a function of them.

    On CUDA the host tensors are pinned and copied asynchronously, so the next batch is in
    flight while the current one trains. The first `skip` batches are cut (the shuffle draws
    the same order) but not decoded: an epoch resumed after its first `skip` steps.
    """
    cuda = torch.device(device).type == "cuda"
    blocks = data.iter_batches(batch_size=None, batch_format="pyarrow",
                               prefetch_batches=prefetch_batches)
    for table in itertools.islice(rebatch(blocks, batch_size, shuffle=shuffle), skip, None):
        with warnings.catch_warnings():
            # Arrow's buffers are read-only and torch warns about that; nothing writes to
            # them (the first step on the device, `to_model_input`, makes a float copy).
            warnings.simplefilter("ignore", UserWarning)
            images = torch.from_numpy(decode_images(table.column("image"), shape, dtype))
        labels = torch.tensor(table.column("label").to_numpy(), dtype=torch.int64)
        if cuda:
            images = images.pin_memory().to(device, non_blocking=True)
            labels = labels.pin_memory().to(device, non_blocking=True)
        if with_ids:
            yield images, labels, table.column("id").to_pylist()
        else:
            yield images, labels


def rebatch(blocks: Iterator[pa.Table], batch_size: int, *,
            shuffle: torch.Generator | None = None) -> Iterator[pa.Table]:
    """Tables of `batch_size` rows (the very last one shorter) cut from a stream of blocks.

    Rows left over at the end of a block open the next block's first batch. With `shuffle`,
    the rows of each block, together with the rows carried over from the one before, are
    put in a random order drawn from that generator before they are cut: rows mix within
    and across shards, on top of the shuffled block order.
    """
    carry = None
    for block in blocks:
        table = block if carry is None else pa.concat_tables([carry, block])
        if shuffle is not None:
            order = torch.randperm(table.num_rows, generator=shuffle)
            table = table.take(pa.array(order.numpy()))
        whole = table.num_rows - table.num_rows % batch_size
        for start in range(0, whole, batch_size):
            yield table.slice(start, batch_size)
        carry = table.slice(whole) if whole < table.num_rows else None
    if carry is not None:
        yield carry
