"""Logged models, their raw-image pyfunc, the registry and dataset records, against a real
SQLite MLflow store in a temporary TLRAY_HOME (no mocks)."""

from __future__ import annotations

import base64
import math
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from tlray.data.preprocess import to_channels, to_model_input
from tlray.errors import TlrayError
from tlray.serve import log_model as logged_model
from tlray.track import registry
from tlray.track.datasets import log_datasets
from tlray.track.run_metrics import link_metrics
from tlray.track.runs import start_run

CLASSES = ["cat", "dog", "fish"]
PRE = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "size": [16, 16], "channels": 3}


def _tiny_model(seed: int, classes: int = 3) -> torch.nn.Module:
    """Conv + BatchNorm (whose running stats must be exported in eval mode) + linear head."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, classes),
    )
    model(torch.randn(8, 3, 16, 16))  # train mode: moves the BatchNorm running stats
    return model


def _pixels(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _expected(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """What training's own preprocessing and the eager model give for uint8 NHWC images."""
    model.eval()
    with torch.no_grad():
        x = to_model_input(torch.from_numpy(to_channels(images, 3).copy()), PRE["mean"], PRE["std"],
                           PRE["size"])
        return torch.softmax(model(x), dim=1).numpy()


def _png(image: np.ndarray) -> bytes:
    return logged_model.png(image if image.ndim == 3 else image[..., None])


@pytest.fixture
def logged(tlray_home: Path):
    """(eager model, logged model info): a tiny RGB classifier logged as tlray logs one."""
    model = _tiny_model(0)
    model.train()
    with start_run("models"):
        info = logged_model.log_model(model, _pixels((2, 10, 10, 3)), CLASSES, PRE)
    assert model.training  # the caller's model is left as it was
    return model, info


def test_the_pyfunc_takes_raw_images_as_pixels_files_or_base64(logged) -> None:
    model, info = logged
    served = mlflow.pyfunc.load_model(info.model_uri)

    rgb = _pixels((5, 10, 10, 3), seed=1)  # not the input size (16): resized as in training
    answer = served.predict(rgb)
    assert answer.columns.tolist() == ["label", "prob_cat", "prob_dog", "prob_fish"]
    expected = _expected(model, rgb)
    np.testing.assert_allclose(answer.filter(like="prob_").to_numpy(), expected, atol=1e-5)
    assert answer["label"].tolist() == [CLASSES[k] for k in expected.argmax(1)]

    grey = _pixels((3, 24, 20), seed=2)  # [N, H, W]: grey, repeated into the 3 channels
    np.testing.assert_allclose(served.predict(grey).filter(like="prob_").to_numpy(),
                               _expected(model, grey[..., None]), atol=1e-5)

    # The same pixels as PNG files, in a DataFrame column, as bytes and as base64 text.
    files = pd.DataFrame({"image": [_png(im) for im in rgb]})
    texts = pd.DataFrame({"image": [base64.b64encode(_png(im)).decode() for im in rgb]})
    for frame in (files, texts):
        pd.testing.assert_frame_equal(served.predict(frame), answer)

    # One image each, of different sizes and channel modes (RGBA is composited on white).
    rgba = _pixels((7, 9, 4), seed=3)
    mixed = np.empty(3, dtype=object)
    mixed[:] = [rgb[0], _png(grey[1]), rgba]
    white = np.asarray(Image.alpha_composite(Image.new("RGBA", (9, 7), (255,) * 4),
                                             Image.fromarray(rgba, "RGBA")).convert("RGB"))
    np.testing.assert_allclose(
        served.predict(mixed).filter(like="prob_").to_numpy(),
        np.concatenate([expected[:1], _expected(model, grey[1:2, ..., None]),
                        _expected(model, white[None])]), atol=1e-5)


def test_the_tensor_network_and_the_shipped_code_are_in_the_same_model(logged) -> None:
    model, info = logged
    tensor = mlflow.pytorch.load_model(info.model_uri, device="cpu")
    model.eval()
    for batch in (5, 1):  # neither is the export example's batch size (2)
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(tensor(x), model(x), rtol=1e-4, atol=1e-5)

    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    shipped = local / "code" / "tlray"
    assert sorted(p.relative_to(shipped).as_posix() for p in shipped.rglob("*.py")) == sorted(
        logged_model.SHIPPED_MODULES)
    assert (local / "artifacts" / "network" / "model.pt2").is_file()
    mlmodel = mlflow.models.Model.load(str(local))
    assert set(mlmodel.flavors) == {"python_function", "pytorch"}
    assert mlmodel.flavors["pytorch"]["model_data"] == "artifacts/network"
    assert mlmodel.metadata["class_names"] == CLASSES
    assert mlmodel.metadata["preprocess"] == {**PRE, "tta": "none"}  # none unless asked
    assert (local / "serving_input_example.json").is_file()  # what a client posts
    requirements = (local / "requirements.txt").read_text()
    assert "torch==" in requirements and "timm" not in requirements


def test_bad_images_are_request_errors_that_name_the_problem(logged) -> None:
    served = mlflow.pyfunc.load_model(logged[1].model_uri)
    undecodable = np.empty(2, dtype=object)
    undecodable[:] = [_png(_pixels((4, 4, 3))), b"not an image at all"]
    cases = [
        (np.random.default_rng(0).random((2, 8, 8, 3)), r"integers 0-255 \(uint8\), got dtype "
                                                          r"float64"),
        (_pixels((2, 8, 8, 2)), r"2 channels .*expected 1 \(grey\), 3 \(RGB\) or 4 \(RGBA\)"),
        (np.full((1, 4, 4), 300, np.int64), r"pixel values must lie in 0-255, got 300"),
        (_pixels((2, 8)), r"pixels must have shape \[N, H, W\] or \[N, H, W, C\]"),
        (undecodable, r"image 1: cannot decode 19 bytes as an image"),
        (pd.DataFrame({"image": ["hello"]}), r"image 0: text that is not base64"),
        (pd.DataFrame({"image": [b""], "id": ["x"]}), r"DataFrame containing multiple columns"),
    ]
    for payload, expected in cases:
        with pytest.raises(MlflowException, match=expected) as err:
            served.predict(payload)
        assert err.value.error_code == "INVALID_PARAMETER_VALUE", expected
    assert len(served.predict(_pixels((1, 8, 8, 1)))) == 1  # and it goes on predicting


def test_log_model_checks_its_inputs(tlray_home: Path) -> None:
    with start_run("models"):
        with pytest.raises(TlrayError, match="class names"):
            logged_model.log_model(_tiny_model(0), _pixels((2, 8, 8, 3)), ["only", "two"], PRE)
        with pytest.raises(TlrayError, match=r"expected uint8 images \[N, H, W, C\]"):
            logged_model.log_model(_tiny_model(0), _pixels((2, 8, 8)), CLASSES, PRE)


def test_default_registered_name_is_valid() -> None:
    name = registry.default_registered_name("mnist", "hf-hub:timm/resnet50.a1_in1k")
    assert name == "mnist-hf-hub_timm_resnet50.a1_in1k"
    assert "/" not in name and ":" not in name
    with pytest.raises(TlrayError, match="backbone"):
        registry.default_registered_name("mnist", " ")


def test_champion_moves_only_on_better_metric(tlray_home: Path) -> None:
    name = registry.default_registered_name("digits", "tiny")
    models = [_tiny_model(seed).eval() for seed in range(3)]
    uris = []
    with start_run("registry"):
        for i, model in enumerate(models):
            uris.append(logged_model.log_model(model, _pixels((2, 8, 8, 3)), CLASSES, PRE,
                                               name=f"model{i}").model_uri)

    first = registry.register_champion(uris[0], name, "test_acc", 0.90, tags={"lr": 0.1})
    assert first == registry.RegistrationResult(1, 1, True, None)
    worse = registry.register_champion(uris[1], name, "test_acc", 0.80)
    assert worse == registry.RegistrationResult(2, 1, False, (1, 0.90))
    better = registry.register_champion(uris[2], name, "test_acc", 0.95)
    assert better == registry.RegistrationResult(3, 3, True, (1, 0.90))
    assert "beats version 1's 0.9000" in registry.alias_note(better, "test_acc", 0.95)
    assert "stays version 1" in registry.alias_note(worse, "test_acc", 0.80)

    client = MlflowClient()
    assert int(client.get_model_version_by_alias(name, "champion").version) == 3
    tags = client.get_model_version(name, "1").tags
    assert tags["test_acc"] == "0.9" and tags["lr"] == "0.1"  # plain names
    assert len(client.search_model_versions(f"name = '{name}'")) == 3

    champion = mlflow.pytorch.load_model(f"models:/{name}@champion", device="cpu")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(champion(x), models[2](x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(champion(x), models[0](x))

    # Another metric: the champion has no test_loss tag and keeps the alias.
    loss = registry.register_champion(uris[0], name, "test_loss", 0.2, mode="min")
    assert loss.moved is False and loss.champion_version == 3
    assert math.isnan(loss.previous[1])
    assert "no test_loss tag" in registry.alias_note(loss, "test_loss", 0.2)


def test_runs_record_their_splits_and_the_models_metrics(tlray_home: Path,
                                                       tmp_path: Path) -> None:
    from tlray.data.pixel_sources import from_arrays
    from tlray.data.prepare import prepare

    info = prepare(from_arrays(_pixels((30, 6, 6, 1)), np.repeat([0, 1, 2], 10)),
                   tmp_path / "tiny", progress=False)
    with start_run("datasets") as run:
        data = log_datasets(info)
        for epoch, acc in ((1, 0.5), (2, 0.9), (3, 0.7)):
            mlflow.log_metrics({"val_acc": acc, "val_loss": 1 - acc}, step=epoch)
        model = logged_model.log_model(_tiny_model(0), _pixels((2, 6, 6, 3)), CLASSES, PRE)
        link_metrics(run.info.run_id, model.model_id, ["val_acc", "val_loss"], 2)
        mlflow.log_metrics({"test_acc": 0.8}, step=3, model_id=model.model_id,
                           dataset=data["test"])

    inputs = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    seen = {(i.dataset.name, i.dataset.digest, {t.key: t.value for t in i.tags}["mlflow.data"
                                                                              ".context"])
            for i in inputs}
    digest = info.fingerprint[:12]
    assert seen == {(f"{info.name}-train", digest, "training"),
                    (f"{info.name}-val", digest, "validation"),
                    (f"{info.name}-test", digest, "testing")}
    assert all(i.dataset.source.endswith(("/train\"}", "/val\"}", "/test\"}")) for i in inputs)

    linked = {m.key: (m.step, m.value) for m in mlflow.get_logged_model(model.model_id).metrics}
    assert linked == {"val_acc": (2, 0.9), "val_loss": (2, pytest.approx(0.1)),
                      "test_acc": (3, 0.8)}
    history = MlflowClient().get_metric_history(run.info.run_id, "val_acc")
    assert sorted(m.step for m in history) == [1, 2, 3]  # linking added no second entry


def test_the_model_serves_with_nothing_of_tlray_but_what_it_ships(logged, tmp_path) -> None:
    # A fresh process that cannot import the installed tlray: the model's own copy must do.
    local = mlflow.artifacts.download_artifacts(logged[1].model_uri, dst_path=str(tmp_path))
    code = f"""
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f)]
import mlflow, numpy as np
model = mlflow.pyfunc.load_model({local!r})
print(model.predict(np.zeros((2, 16, 16, 3), np.uint8)).shape)
used = sorted(m.__file__ for name, m in sys.modules.items() if name.startswith("tlray"))
assert all(f.startswith({local!r}) for f in used), used
print(len(used))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == f"(2, {len(CLASSES) + 1})"  # label and each class probability
    assert int(lines[-1]) == len(logged_model.SHIPPED_MODULES)
