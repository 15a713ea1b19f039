"""Frozen-backbone feature cache: run a model's frozen front once, train the rest from its outputs.

A trial that freezes the first k groups of a backbone feeds every image through those groups
every epoch, and every trial of a sweep with the same dataset, backbone, weights, freeze depth
and input size does it again, although the result never changes: tlray applies no random
augmentation, and frozen groups hold FrozenBatchNorm (no running statistics move). The cache
computes those outputs once, stores them as a dataset of their own (the prepared-dataset
layout, with float32 arrays in place of pixels) under `<storage>/feature_cache/<key>`, and
training runs only the trainable rest of the model on them. Linear-probe and high-freeze
trials become a small head's training.

Where a model is cut in two is `tlray.model.cut`'s job; a model whose forward is not a chain
of its children is simply trained uncached.

The key is a hash of the dataset's fingerprint, the input size and normalisation, where the
cut is, and the front's own weights and buffers: a cache can never be reused for different
weights (a `models:/...@champion` alias that moved, a re-downloaded checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from tlray.data.dataset import (
    DatasetInfo,
    SplitInfo,
    decode_images,
    encode_arrays,
    filesystem,
    load_info,
    temporary_sibling,
)
from tlray.model.cut import ModelCut, NotAChain, cut_model

CACHED_SPLITS = ("train", "val")  # the test split is evaluated on images, by the whole model


# "auto" skips a cut whose outputs have more than this many times the input's elements: such
# a front is shallow (a stem at full resolution), cheap to recompute and costly to store.
MAX_GROWTH = 4
# The front's weights, stored with its outputs: a run training from the cache loads them,
# so that its front is by construction the one that computed the cache.
FRONT_WEIGHTS = "front.safetensors"


def choose(mode: str, model: nn.Module, input_shape: tuple[int, int, int], info: DatasetInfo,
           budget_bytes: float) -> tuple[ModelCut | None, str]:
    """Whether to train this model from cached features (`train.feature_cache`), and why."""
    if mode == "never":
        return None, "not used (train.feature_cache=never)"
    try:
        cut = cut_model(model, input_shape)
    except NotAChain as e:
        return None, f"not used: {e}"
    if cut is None:
        return None, "not used: no frozen front to cache (freeze depth 0)"
    nbytes = sum(info.splits[s].rows for s in CACHED_SPLITS) * int(np.prod(cut.shape)) * 4
    growth = int(np.prod(cut.shape)) / int(np.prod(input_shape))
    if mode == "auto" and growth > MAX_GROWTH:
        return None, (f"not used: the outputs of {cut.after} are {growth:.0f}x the input's size "
                      f"(a shallow front saves little; train.feature_cache=always forces it)")
    if mode == "auto" and nbytes > budget_bytes:
        return None, (f"not used: the outputs of {cut.after} for train+val would take "
                      f"{nbytes / 2**30:.2f} GB, more than data.cache_gb")
    return cut, (f"outputs of {cut.after} {tuple(cut.shape)} for train+val, "
                 f"{nbytes / 2**20:.0f} MB")


def cache_key(cut: ModelCut, info: DatasetInfo, data_config: dict, size: int) -> str:
    """What the cached outputs depend on: data, preprocessing, the cut and the front's weights."""
    digest = hashlib.sha256()
    # The cached fronts saw images as they are: augmented training never reads a cache.
    digest.update(json.dumps({"dataset": info.fingerprint, "size": size, "cut": cut.after,
                              "mean": list(data_config["mean"]), "std": list(data_config["std"]),
                              "augmentation": "none", "version": 2}, sort_keys=True).encode())
    for name, tensor in cut.front.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def load_front(uri: str, front: nn.Module) -> None:
    """Gives `front` the weights that computed the cache at `uri`."""
    fs, path = filesystem(uri)
    with fs.open_input_stream(f"{path}/{FRONT_WEIGHTS}") as f:
        front.load_state_dict(load_safetensors(f.read()))


def cache_uri(root: str, key: str) -> str:
    return f"{root.rstrip('/')}/{key}"


def existing(uri: str) -> DatasetInfo | None:
    """The finished cache at `uri`, or None (absent or incomplete)."""
    fs, path = filesystem(uri)
    if fs.get_file_info(f"{path}/dataset.json").type != pafs.FileType.File:
        return None
    try:
        return load_info(uri)
    except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt
        return None


@torch.no_grad()
def build(cut: ModelCut, info: DatasetInfo, uri: str, *, mean, std, size: int,
          batch_size: int = 256, device: str = "cpu", amp: bool = False,
          channels_last: bool = True) -> DatasetInfo:
    """Runs `cut.front` over the cached splits and writes them as a dataset at `uri`.

    One output shard per input shard, rows in the same order (labels and ids carried
    over). Written to a temporary sibling and renamed into place; if another process
    published the same cache first, its copy is kept and this one discarded.
    """
    from tlray.data.preprocess import to_model_input

    done = existing(uri)
    if done is not None:
        return done
    started = time.perf_counter()
    front = cut.front.to(device).eval()
    if channels_last:
        front.to(memory_format=torch.channels_last)
    fs, root = filesystem(uri)
    tmp = temporary_sibling(root, "tmp")
    fs.create_dir(tmp, recursive=True)
    splits, shape = {}, None
    try:
        for name in CACHED_SPLITS:
            fs.create_dir(f"{tmp}/{name}", recursive=True)
            shards = []
            for i, shard_uri in enumerate(info.shard_uris(name)):
                sfs, spath = filesystem(shard_uri)
                table = pq.read_table(spath, filesystem=sfs)
                images = decode_images(table.column("image"), info.image_shape)
                outputs = []
                for start in range(0, len(images), batch_size):
                    x = to_model_input(torch.from_numpy(images[start:start + batch_size].copy())
                                       .to(device), mean, std, (size, size),
                                       channels_last=channels_last)
                    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                                        enabled=amp):
                        outputs.append(front(x).float().cpu().numpy())
                arrays = (np.concatenate(outputs) if outputs else
                          np.zeros((0, *(shape or ())), np.float32))
                shape = shape or list(arrays.shape[1:])
                rel = f"{name}/part-{i:05d}.parquet"
                pq.write_table(pa.Table.from_arrays(
                    [encode_arrays(arrays), table.column("label"), table.column("id")],
                    names=["image", "label", "id"]), f"{tmp}/{rel}", filesystem=fs,
                    compression="none")
                shards.append(rel)
            splits[name] = SplitInfo(info.splits[name].rows, shards,
                                     dict(info.splits[name].class_counts))
        meta = DatasetInfo(
            uri=uri, name=f"{info.name}-features", classes=info.classes, height=info.height,
            width=info.width, channels=info.channels, mode=info.mode, splits=splits,
            source={"kind": "feature-cache", "uri": info.uri, "fingerprint": info.fingerprint},
            options={"size": size, "mean": list(mean), "std": list(std)},
            fingerprint=cache_key(cut, info, {"mean": mean, "std": std}, size),
            dtype="float32", shape=shape,
            features={"cut": cut.after, "seconds": round(time.perf_counter() - started, 2)},
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        with fs.open_output_stream(f"{tmp}/{FRONT_WEIGHTS}") as f:
            f.write(save_safetensors({k: v.detach().cpu().contiguous()
                                      for k, v in cut.front.state_dict().items()}))
        with fs.open_output_stream(f"{tmp}/dataset.json") as f:
            f.write(json.dumps(meta.to_json(), indent=2).encode())
        try:
            # A rename onto a directory that exists fails, atomically: a cache that another
            # build published first is never moved aside under a run that is reading it.
            fs.move(tmp, root)
        except OSError:
            if existing(uri) is None:
                raise
            fs.delete_dir(tmp)
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_dir(tmp)
        raise
    return load_info(uri)

