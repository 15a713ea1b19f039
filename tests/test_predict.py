"""tlray.serve.predict against a real SQLite MLflow store and real logged tlray models (no mocks).

The models are tiny but real (`brightness_models`): the right answer is known for every
generated image. predict itself only hands images to the model's pyfunc, which does the
conversions.
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from brightness_models import SIZE, Brightness, bright_images, log_champion, png

from tlray.data.pixel_sources import from_arrays
from tlray.data import dataset as datasets
from tlray.data.prepare import prepare
from tlray.errors import TlrayError
from tlray.serve.predict import predict
from tlray.serve.predict_output import write_csv_atomic
from tlray.track.runs import start_run

@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """A store with champions `bright` (grey input) and `bright-rgb` (RGB input), plus a
    plain tensor model (`bare`) that tlray did not log."""
    tmp = tmp_path_factory.mktemp("predict-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        mp.setenv("TLRAY_HOME", str(tmp))
        uris = {}
        with start_run("predict-tests") as run:
            for name, channels in (("bright", 1), ("bright-rgb", 3)):
                uris[name] = log_champion(name, channels)
            uris["bare"] = mlflow.pytorch.log_model(
                Brightness(0.5, 0.5), name="bare", pip_requirements=["torch"],
                input_example=np.zeros((2, 1, *SIZE), np.float32)).model_uri
            uris["run_id"] = run.info.run_id
        yield uris


@pytest.fixture
def work(store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory, where the default output files go."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write_pixel_csv(path: Path, images: np.ndarray, labels: list[int] | None = None) -> Path:
    flat = images.reshape(len(images), -1)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        pixels = [f"pixel{i}" for i in range(flat.shape[1])]
        w.writerow(pixels if labels is None else ["label", *pixels])
        for i, row in enumerate(flat):
            w.writerow(list(row) if labels is None else [labels[i], *row])
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


# --------------------------------------------------------------------------- Kaggle CSVs


def test_kaggle_test_csv_writes_a_submission(work: Path, capsys) -> None:
    levels = [200, 0, 100, 100, 0, 200, 200, 0, 100]
    source = _write_pixel_csv(work / "test.csv", bright_images(levels))

    # batch 4: the last batch holds one image (the pt2 batch dimension is dynamic)
    frame = predict("models:/bright@champion", source, batch_size=4)

    text = (work / "submission.csv").read_text()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["ImageId", "Label"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, len(levels) + 1))
    assert [r[1] for r in rows[1:]] == [str(v // 100) for v in levels]
    assert frame.columns.tolist() == ["ImageId", "Label"]
    assert frame.attrs["path"] == str(work / "submission.csv")
    assert _leftovers(work) == []

    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1
    assert "9 rows" in summary[0] and "submission.csv" in summary[0]
    assert "version 1" in summary[0] and "0: 3, 1: 3, 2: 3" in summary[0]


def test_grey_csv_on_an_rgb_model_and_probs_format(work: Path) -> None:
    """Grey pixels are repeated into the 3 channels an RGB model expects."""
    levels = [0, 100, 200, 100]
    source = _write_pixel_csv(work / "test.csv", bright_images(levels, seed=1))
    frame = predict("bright-rgb", source, format="probs", out=work / "out" / "p.csv",
                    verbose=False)  # a bare name means its @champion

    written = pd.read_csv(work / "out" / "p.csv", dtype={"class": str})
    assert written.columns.tolist() == ["id", "class", "prob_0", "prob_1", "prob_2"]
    assert written["id"].tolist() == [f"test.csv:row {i}" for i in range(1, 5)]
    assert written["class"].tolist() == ["0", "1", "2", "1"]
    probs = written[["prob_0", "prob_1", "prob_2"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs.max(axis=1) > 0.9).all()
    assert frame.attrs["accuracy"] is None


def test_labelled_csv_keeps_labels_and_reports_accuracy(work: Path) -> None:
    levels = [0, 100, 200, 200]
    source = _write_pixel_csv(work / "train.csv", bright_images(levels), labels=[0, 1, 2, 1])
    frame = predict("models:/bright/1", source, verbose=False)
    assert frame.attrs["path"] == str(work / "predictions.csv")  # not a Kaggle test.csv
    assert frame["label"].tolist() == ["0", "1", "2", "1"]
    assert frame.attrs["accuracy"] == pytest.approx(0.75)


# --------------------------------------------------------------------------- prepared datasets


def test_kaggle_dataset_predict_split_is_a_submission_in_test_csv_order(work: Path) -> None:
    kaggle = work / "digit-recognizer"
    kaggle.mkdir()
    train_levels = [0, 100, 200] * 10
    _write_pixel_csv(kaggle / "train.csv", bright_images(train_levels),
                     labels=[v // 100 for v in train_levels])
    test_levels = [100, 200, 0, 0, 200, 100, 100]
    _write_pixel_csv(kaggle / "test.csv", bright_images(test_levels, seed=2))
    dest = work / "prepared"
    prepare(str(kaggle), dest, rows_per_shard=3, progress=False)  # 3 predict shards

    frame = predict("models:/bright@champion", dest, verbose=False)
    assert frame.attrs["path"] == str(work / "submission.csv")
    assert frame["ImageId"].tolist() == list(range(1, len(test_levels) + 1))
    assert frame["Label"].tolist() == [str(v // 100) for v in test_levels]

    test = predict("models:/bright@champion", dest, split="test", out="test.csv",
                   verbose=False)
    assert test.columns.tolist()[:3] == ["id", "class", "label"]
    assert len(test) == 3 and test.attrs["accuracy"] == 1.0
    assert (test["class"] == test["label"]).all()


def test_rgb_dataset_on_a_grey_model_uses_luminance(work: Path) -> None:
    """Pure red (L = 76) is nearest 100; white is 255 -> class 2; its default split is test."""
    red = np.zeros((10, 6, 6, 3), np.uint8)
    red[..., 0] = 255
    white = np.full((10, 6, 6, 3), 255, np.uint8)
    black = np.zeros((10, 6, 6, 3), np.uint8)
    labels = np.repeat([1, 2, 0], 10)
    src = from_arrays(np.concatenate([red, white, black]), labels)
    dest = work / "colours"
    prepare(src, dest, progress=False)

    frame = predict("models:/bright@champion", dest, verbose=False)
    assert len(frame) == datasets.load_info(dest).splits["test"].rows == 3
    assert (frame["class"] == frame["label"]).all()
    assert np.allclose(frame.filter(like="prob_").sum(axis=1), 1.0, atol=1e-5)

    with pytest.raises(TlrayError, match=r"no 'predict' split \(it has train, val, test\)"):
        predict("models:/bright@champion", dest, split="predict", verbose=False)


# --------------------------------------------------------------------------- image folders


def test_image_folder_with_class_folders_and_mixed_sizes(work: Path) -> None:
    folder = work / "images" / "wrapper"  # a single wrapping folder is looked through
    png(folder / "0" / "a.png", bright_images([0], (10, 10, 1))[0])
    png(folder / "1" / "b.png", bright_images([100], (20, 14, 3))[0])
    red = np.zeros((9, 9, 4), np.uint8)  # RGBA: opaque red on a grey model, L = 76 -> "1"
    red[..., 0], red[..., 3] = 255, 255
    Image.fromarray(red, "RGBA").save(folder / "1" / "red.png")
    png(folder / "2" / "c.jpg", bright_images([200], (12, 12, 3))[0])
    png(folder / "unsorted" / "d.png", bright_images([200], (8, 8, 1))[0])
    (folder / "2" / "Thumbs.db").write_bytes(b"junk")
    (folder / "README.txt").write_text("not an image")

    frame = predict("models:/bright@champion", work / "images", verbose=False)
    assert frame["id"].tolist() == ["wrapper/0/a.png", "wrapper/1/b.png", "wrapper/1/red.png",
                                    "wrapper/2/c.jpg", "wrapper/unsorted/d.png"]
    assert frame["class"].tolist() == ["0", "1", "1", "2", "2"]
    assert frame["label"].tolist() == ["0", "1", "1", "2", ""]  # "unsorted" is no class
    assert frame.attrs["accuracy"] == 1.0

    # The same images zipped, and one image on its own.
    archive = work / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(folder.rglob("*.png")):
            z.write(p, p.relative_to(work / "images").as_posix())
    zipped = predict("models:/bright-rgb@champion", archive, out="zip.csv", verbose=False)
    assert zipped["class"].tolist() == ["0", "1", "1", "2"]
    single = predict("models:/bright@champion", folder / "0" / "a.png", out="one.csv",
                     format="kaggle", verbose=False)
    assert single.to_dict("list") == {"ImageId": [1], "Label": ["0"]}


def test_flat_image_folder_as_csv_and_as_parquet_shards(work: Path) -> None:
    for name, level in (("x.png", 200), ("y.bmp", 0), ("z.jpeg", 100)):
        png(work / "flat" / name, bright_images([level], (16, 16, 3))[0])
    frame = predict("models:/bright-rgb@champion", work / "flat", verbose=False)
    assert frame.columns.tolist() == ["id", "class", "prob_0", "prob_1", "prob_2"]
    assert dict(zip(frame["id"], frame["class"])) == {"x.png": "2", "y.bmp": "0", "z.jpeg": "1"}

    predict("models:/bright-rgb@champion", work / "flat", out=work / "answers.parquet",
            verbose=False)
    assert sorted(p.name for p in (work / "answers.parquet").iterdir()) == ["part-00000.parquet"]
    shards = pd.read_parquet(work / "answers.parquet")
    pd.testing.assert_frame_equal(shards, pd.read_csv(work / "predictions.csv", dtype={
        "class": str}), check_exact=False, atol=1e-6)


def test_unreadable_images_are_named_together_and_nothing_is_written(work: Path) -> None:
    png(work / "dump" / "a.png", bright_images([0], (8, 8, 1))[0])
    (work / "dump" / "b.png").write_text("not a picture")
    png(work / "dump" / "c.png", bright_images([200], (40, 40, 3))[0])
    (work / "dump" / "c.png").write_bytes((work / "dump" / "c.png").read_bytes()[:90])
    with pytest.raises(TlrayError) as error:
        predict("models:/bright@champion", work / "dump", batch_size=2, verbose=False)
    lines = str(error.value).splitlines()
    assert lines[0].endswith("2 problem(s), nothing was written:")
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["b.png", "c.png"]
    assert all("cannot decode" in line for line in lines[1:])
    assert sorted(p.name for p in work.iterdir()) == ["dump"]


# --------------------------------------------------------------------------- bad input


def test_unknown_models_name_what_exists(work: Path, store) -> None:
    source = _write_pixel_csv(work / "test.csv", bright_images([0]))
    cases = {
        "models:/nope@champion": r"no registered model named 'nope' in the tracking "
                                 r"store sqlite:///.*bright, bright-rgb",
        "models:/bright@staging": r"'bright' has no alias 'staging'.*@champion -> version 1"
                                  r".*versions: 1",
        "models:/bright/7": r"'bright' has no version '7'.*versions: 1",
        "models:/m-0123456789abcdef": r"no logged model with id 'm-0123456789abcdef'",
        "runs:/0123456789abcdef/model": r"run '0123456789abcdef' does not exist",
        f"runs:/{store['run_id']}/missing": r"no model at 'missing'.*bare, bright, bright-rgb",
        "no/such/dir": r"no MLflow model there.*models:/NAME@ALIAS",
    }
    for uri, expected in cases.items():
        with pytest.raises(TlrayError, match=expected) as err:
            predict(uri, source, verbose=False)
        assert uri in str(err.value)
    assert not (work / "submission.csv").exists()


def test_a_model_that_takes_tensors_is_refused(work: Path, store) -> None:
    source = _write_pixel_csv(work / "test.csv", bright_images([0]))
    with pytest.raises(TlrayError, match=r"not a tlray image classifier .*pytorch.*no "
                                         r"class_names metadata.*--model.weights="):
        predict(store["bare"], source, verbose=False)
    assert not (work / "submission.csv").exists()


def test_bad_sources_and_options_fail_before_writing(work: Path) -> None:
    good = _write_pixel_csv(work / "test.csv", bright_images([0]))
    (work / "empty").mkdir()
    (work / "empty" / "notes.txt").write_text("no images here")
    (work / "bad.csv").write_text("pixel0,pixel1,pixel2\n1,2,3\n")
    (work / "outdir").mkdir()
    champion = "models:/bright@champion"
    cases = [
        ((champion, work / "missing"), {}, r"source '.*missing' does not exist"),
        ((champion, work / "empty"), {}, r"no images found .*1 other file"),
        ((champion, work / "bad.csv"), {}, r"3 pixel columns do not make a square image"),
        ((champion, good), {"split": "test"}, r"--split 'test' applies to prepared datasets"),
        ((champion, good), {"format": "json"}, r"--format must be one of"),
        ((champion, good), {"batch_size": 0}, r"--batch-size must be a positive integer"),
        ((champion, good), {"engine": "spark"}, r"--engine must be one of auto, local, ray"),
        ((champion, good), {"replicas": 2}, r"--replicas is for --engine ray"),
        ((champion, good), {"engine": "ray", "cpus_per_replica": 0},
         r"--cpus-per-replica must be more than 0"),
        ((champion, good), {"out": work / "outdir"}, r"is a directory"),
        (("models:/nope@champion", work / "missing"), {}, r"does not exist"),  # source first
    ]
    for args, kwargs, expected in cases:
        with pytest.raises(TlrayError, match=expected):
            predict(*args, verbose=False, **kwargs)
    assert sorted(p.name for p in work.iterdir()) == ["bad.csv", "empty", "outdir", "test.csv"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without a GPU")
def test_gpu_on_a_machine_without_one_is_one_clear_error(work: Path) -> None:
    source = _write_pixel_csv(work / "test.csv", bright_images([0]))
    with pytest.raises(TlrayError, match=r"--gpu: this machine has no CUDA GPU"):
        predict("models:/bright@champion", source, gpu=True, verbose=False)
    assert sorted(p.name for p in work.iterdir()) == ["test.csv"]


def test_write_is_atomic(work: Path) -> None:
    target = work / "predictions.csv"
    target.write_text("previous complete file\n")

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("disk full, say")

    rows = [f"row {i}" for i in range(50_000)] + [Unprintable()]
    with pytest.raises(RuntimeError, match="disk full"):
        write_csv_atomic(pd.DataFrame({"id": rows}), target)
    assert target.read_text() == "previous complete file\n"
    assert _leftovers(work) == []

    write_csv_atomic(pd.DataFrame({"id": ["a", "b"]}), target)
    assert target.read_text() == "id\na\nb\n"
    assert _leftovers(work) == []
