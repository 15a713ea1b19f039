"""`tlray prepare` in Ray tasks on a real local Ray cluster, against the in-process prepare of
the same source: the same dataset, every problem of the source in one run, and a dataset that
is complete or absent when the prepare is killed half-way."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster_helpers import driver_env, wait_for
from stuck_files import release_readers, stuck_file

from tlray.data.dataset import load_info
from tlray.data.prepare import prepare
from tlray.errors import TlrayError

pytestmark = pytest.mark.ray


def write_cells(root: Path, per_class: int = 15, classes=("a", "b"), seed: int = 0) -> Path:
    """RGB PNGs of a few sizes (prepare resizes them) in one folder per class."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = 10 + i % 3
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
                root / c / f"img{i:03d}.png")
    return root


def shard_tables(info) -> list:
    return [pq.read_table(uri) for split in info.splits for uri in info.shard_uris(split)]


def tasks_named(ray, name: str) -> int:
    from ray.util.state import list_tasks

    return len(list_tasks(address=ray.get_runtime_context().gcs_address,
                          filters=[("name", "=", name), ("state", "=", "FINISHED")],
                          limit=10_000, raise_on_missing_output=False))


def test_ray_tasks_write_the_dataset_the_in_process_prepare_writes(ray_cluster, tmp_path):
    cells = write_cells(tmp_path / "cells")
    options = dict(image_size=(8, 8), rows_per_shard=4, seed=3, progress=False)
    before = tasks_named(ray_cluster, "write_shard")
    here = prepare(str(cells), tmp_path / "here", engine="local", **options)
    on_ray = prepare(str(cells), tmp_path / "ray", engine="ray", **options)
    # The object-store code path (pyarrow's filesystems), source and destination as URIs.
    by_uri = prepare(f"file://{cells}", f"file://{tmp_path / 'uri'}", engine="ray", **options)

    shards = sum(len(s.shards) for s in here.splits.values())
    assert shards == 8  # 30 images, 4 per shard: 6 train, 1 val, 1 test
    wait_for(lambda: tasks_named(ray_cluster, "write_shard") >= before + 2 * shards, 60,
             "the Ray tasks that wrote the shards to be listed")
    for other in (on_ray, by_uri):
        assert other.fingerprint == here.fingerprint
        assert {k: asdict(v) for k, v in other.splits.items()} == \
            {k: asdict(v) for k, v in here.splits.items()}
        assert (other.classes, other.image_shape, other.mode) == \
            (here.classes, here.image_shape, here.mode)
        assert all(a.equals(b) for a, b in zip(shard_tables(other), shard_tables(here)))
    ids = [i for table in shard_tables(on_ray) for i in table.column("id").to_pylist()]
    assert sorted(ids) == sorted(f"{c}/img{i:03d}.png" for c in "ab" for i in range(15))


def test_a_corrupt_and_an_unreadable_file_are_reported_in_one_run(ray_cluster, tmp_path):
    cells = write_cells(tmp_path / "cells")
    corrupt = cells / "a" / "img004.png"
    corrupt.write_bytes(corrupt.read_bytes()[:60])  # its header still reads: decoding fails
    (cells / "b" / "gone.png").symlink_to(tmp_path / "deleted.png")  # listed, cannot be read
    (cells / "b" / "notes.png").write_text("not a picture")

    with pytest.raises(TlrayError) as error:
        prepare(str(cells), tmp_path / "out", engine="ray", image_size=(8, 8), progress=False)
    lines = str(error.value).splitlines()
    assert lines[0] == f"{cells}: 3 problem(s), nothing was written:"
    assert [line.split(":")[0].strip() for line in lines[1:4]] == \
        ["a/img004.png", "b/gone.png", "b/notes.png"]
    assert all("not a readable image" in line for line in lines[1:4])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells"]  # no dataset, no leftovers

    info = prepare(str(cells), tmp_path / "out", engine="ray", skip_corrupt=True,
                   image_size=(8, 8), progress=False)
    assert [s["item"] for s in info.skipped] == ["a/img004.png", "b/gone.png", "b/notes.png"]
    assert sum(s.rows for s in info.splits.values()) == 29  # 30 images, 1 of them corrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells", "out"]


def test_a_prepare_killed_half_way_leaves_no_dataset_and_the_next_one_succeeds(
        ray_cluster, tlray_home, tmp_path):
    cells = write_cells(tmp_path / "cells", per_class=20)
    # A file whose reading never ends (a hung network mount, say): the task that decodes
    # its shard waits, every other shard gets written, and the prepare can never finish.
    stuck = cells / "b" / "zzz.png"
    stuck_file(stuck)
    dest = tmp_path / "out"
    driver = subprocess.Popen(
        [sys.executable, "-m", "tlray.cli", "prepare", str(cells), str(dest), "--engine", "ray",
         "--image-size", "8", "--mode", "RGB", "--rows-per-shard", "3"],
        env=driver_env(ray_cluster, tlray_home), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: list(tmp_path.glob(".out.tmp-*/*/part-*.parquet"))
                 or driver.poll() is not None, 120, "a shard in the temporary sibling")
        assert driver.poll() is None, driver.communicate()[0].decode()[-3000:]
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.communicate(timeout=30)
    assert not dest.exists()
    assert list(tmp_path.glob(".out.tmp-*"))  # what it had written, in the hidden sibling

    # Ray ends the dead driver's tasks; until then, let their reads of the file end.
    wait_for(lambda: release_readers(stuck), 60, "the killed prepare's tasks to end")
    stuck.unlink()
    Image.new("RGB", (12, 12), "white").save(stuck)
    info = prepare(str(cells), dest, engine="ray", image_size=(8, 8), mode="RGB",
                   rows_per_shard=3, progress=False)
    assert sum(s.rows for s in info.splits.values()) == 41  # the stuck file is an image now
    assert load_info(dest).fingerprint == info.fingerprint
    assert not list(tmp_path.glob(".out.*"))  # the killed run's leftovers are gone

