"""`tlray predict` as a Ray Data pipeline: the source's references as a stream of blocks, a pool
of model replicas (each loads the model once, with its own CPUs or a GPU) that read and score
them, and the answers streaming back to the driver in the source's order.

The replicas read the images themselves (files, shards or pixel rows, through the same reader
as the local loop), so the pipeline needs no CPU beyond the replicas' own: on a 2-CPU machine
two replicas of one CPU each is a complete pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

from tlray.data.executors import join_or_start_ray, lost_work_explained
from tlray.errors import TlrayError
from tlray.serve.predict_inputs import Inputs
from tlray.serve.predict_model import load_model
from tlray.serve.predict_scoring import score

REPLICAS_START_S = 600  # room for a cluster's autoscaler to add the machines they need

class Replica:
    """One model replica: loads the model once, then scores every block of references it is
    handed (a callable class, as Ray Data's `map_batches` runs on an actor pool)."""

    def __init__(self, reader, model_uri: str, shown_uri: str, tracking_uri: str, device: str,
                 class_names: list[str], batch_size: int):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        self.reader, self.class_names, self.batch_size = reader, class_names, batch_size
        # A model this replica cannot load is the user's to fix: the error goes back with
        # the first block, as the exception itself (from a constructor, Ray would turn it
        # into an "actor died" with the message as text).
        try:
            self.model = load_model(model_uri, shown_uri, device, quiet=True)
            self.cannot_load = None
        except TlrayError as e:
            self.model, self.cannot_load = None, e

    def __call__(self, refs: pa.Table) -> Iterator[pa.Table]:
        if self.cannot_load is not None:
            raise self.cannot_load
        for batch in self.reader(refs, self.batch_size):
            yield score(self.model, batch, self.class_names)


def score_on_ray(inputs: Inputs, *, model_uri: str, shown_uri: str, tracking_uri: str,
                 class_names: list[str], batch_size: int, replicas: int | None,
                 cpus_per_replica: float, gpu: bool,
                 connect: Callable[[], None] | None = None) -> Iterator[pa.Table]:
    """The answers (see `tlray.serve.predict_scoring.score`), block by block, in order.

    Args:
        replicas: model replicas (default: as many as the cluster has GPUs with `gpu`, else
            CPUs / `cpus_per_replica`).
        cpus_per_replica: CPUs each replica reserves (its torch threads).
        gpu: one GPU per replica, the network on it.
        connect: joins or starts Ray (the CLI passes tlray's `init_ray`).
    """
    (connect or join_or_start_ray)()  # first: it configures Ray Data's logging
    import ray
    import ray.data

    replicas = _replicas(replicas, cpus_per_replica, gpu)
    # A batch per block, fewer when there are few images: every replica gets some.
    per_block = inputs.refs_per_block or min(batch_size, -(-inputs.refs.num_rows // replicas))
    # `take` copies each block's rows: a slice would carry the whole table's buffers along.
    blocks = [inputs.refs.take(np.arange(start, min(start + per_block, inputs.refs.num_rows)))
              for start in range(0, inputs.refs.num_rows, per_block)]
    data = ray.data.from_blocks(blocks)
    data.context.execution_options.preserve_order = True
    # Images flow once every replica has loaded the model: the work is shared by all of
    # them from the start, and a model that cannot load fails at once.
    data.context.wait_for_min_actors_s = REPLICAS_START_S
    answers = data.map_batches(
        Replica, fn_constructor_args=(inputs.reader, model_uri, shown_uri, tracking_uri,
                                      "cuda" if gpu else "cpu", class_names, batch_size),
        batch_size=None, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=replicas),
        num_cpus=cpus_per_replica, num_gpus=1 if gpu else None)
    try:
        with lost_work_explained("tlray predict"):
            yield from answers.iter_batches(batch_size=None, batch_format="pyarrow")
    except ray.exceptions.GetTimeoutError:
        raise TlrayError(f"tlray predict: {replicas} model replica(s) did not start within "
                         f"{REPLICAS_START_S} s (a cluster that has to grow for them, or "
                         f"stuck workers); nothing was written, run it again") from None


def _replicas(asked: int | None, cpus_per_replica: float, gpu: bool) -> int:
    """How many replicas, checked against what the cluster has (a pool that cannot start
    would wait forever)."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if gpu and gpus < 1:
        raise TlrayError("--gpu: the Ray cluster has no GPU; predict on a GPU cluster, or "
                         "without --gpu")
    fits = int(gpus) if gpu else int(cpus // cpus_per_replica)
    replicas = asked or max(1, fits)
    if replicas * cpus_per_replica > cpus or (gpu and replicas > gpus):
        raise TlrayError(f"--replicas {replicas} x --cpus-per-replica {cpus_per_replica:g}"
                         f"{' and 1 GPU each' if gpu else ''} need more than the Ray cluster "
                         f"has ({cpus:g} CPUs, {gpus:g} GPUs); use fewer replicas, or "
                         f"fractional --cpus-per-replica")
    return replicas
