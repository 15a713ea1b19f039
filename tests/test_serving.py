"""The champion of a real sweep, deployed: MLflow's own scoring server, the pyfunc in Python,
`tlray predict` and the registry entry a person chooses by, all on the same digits.

One sweep (2 trials of the packaged ImageNet EfficientNet-Lite0 on the built-in digits, on
the session's local Ray cluster and a SQLite store), then `mlflow models serve` on
127.0.0.1 in a process group of its own, stopped whatever happens.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
from cluster_helpers import VENV_BIN, free_port, kill_groups, start_group, wait_for
from mlflow import MlflowClient
from PIL import Image

from tlray import config
from tlray.data.dataset import iter_split
from tlray.data.prepare import prepare
from tlray.serve.predict import predict
from tlray.tune import sweep

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

NAME = "served-digits"
SWEEP = ["--model.backbone=tf_efficientnet_lite0", "--model.weights=packaged",
         "--data.image_size=32", "--scaling.num_workers=1", "--scaling.cpus_per_worker=1",
         "--train.epochs=2", "--tune.freeze=6", "--tune.num_samples=1",
         "--tune.lr_min=3e-3", "--tune.lr_max=3e-3",
         "--tune.grace_period=2", f"--tune.registered_name={NAME}"]
IMAGES = 40  # test digits sent every way


@pytest.fixture(scope="module")
def champion(ray_cluster, tmp_path_factory, prepared_digits):
    """The sweep's result, its store and the test digits, in a TLRAY_HOME of this module's
    (with the session's prepared digits, which `prepare` then finds up to date)."""
    home = tmp_path_factory.mktemp("served-home")
    shutil.copytree(prepared_digits, home / "datasets" / prepared_digits.name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLRAY_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        from tlray.track.store import configure

        uri = configure()
        info = prepare("builtin:mnist", progress=False)
        result = sweep.sweep(config.load(None, SWEEP + [f"--data.dataset={info.uri}"]))
        images, labels, ids = next(iter_split(info, "test"))
        trained = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(
            f"runs:/{result.best_run_id}/test_predictions.csv")), dtype={"label": str,
                                                                         "class": str})
        yield {"result": result, "info": info, "tracking_uri": uri, "home": home,
               "images": images[:IMAGES], "labels": [info.classes[i] for i in labels[:IMAGES]],
               "ids": ids[:IMAGES], "trained": trained.set_index("id").loc[ids[:IMAGES]]}


@pytest.fixture(scope="module")
def server(champion, tmp_path_factory):
    """`mlflow models serve -m models:/NAME@champion --env-manager local` on 127.0.0.1."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion["tracking_uri"],
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = start_group([str(VENV_BIN / "mlflow"), "models", "serve", "-m",
                        f"models:/{NAME}@champion", "--env-manager", "local", "--host",
                        "127.0.0.1", "-p", str(port)], log, env=env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {proc.returncode}:\n"
                               + log.read_text())
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2):  # noqa: S310
                return True
        except (urllib.error.URLError, OSError):
            return False

    try:
        wait_for(up, 300, f"mlflow models serve on {url}", 1.0)
        yield url
    finally:
        kill_groups([proc], grace_s=5.0)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _png_base64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _probs(frame: pd.DataFrame, classes: list[str]) -> np.ndarray:
    return frame[[f"prob_{c}" for c in classes]].to_numpy(np.float64)


def test_the_server_answers_pngs_and_pixels_as_training_and_predict_do(champion, server,
                                                                       tmp_path):
    classes, images = champion["info"].classes, champion["images"]
    trained = champion["trained"]  # the workers' own test evaluation, for the same rows
    pngs = {"dataframe_split": {"columns": ["image"],
                                "data": [[_png_base64(im)] for im in images]}}
    pixels = {"inputs": images.tolist()}  # uint8 [N, 28, 28, 1] as JSON integers
    answers = {}
    for name, body in (("png", pngs), ("pixels", pixels)):
        status, reply = _post(server, body)
        assert status == 200, (name, reply)
        answers[name] = pd.DataFrame(reply["predictions"])
        assert answers[name]["label"].tolist() == trained["class"].tolist(), name
        np.testing.assert_allclose(_probs(answers[name], classes), _probs(trained, classes),
                                   atol=1e-5, err_msg=name)

    # tlray predict on the prepared test split: the same model, the same numbers.
    out = predict(f"models:/{NAME}@champion", champion["info"].uri, split="test",
                  out=tmp_path / "p.csv", verbose=False).set_index("id").loc[champion["ids"]]
    assert out["class"].tolist() == trained["class"].tolist()
    np.testing.assert_allclose(_probs(out, classes), _probs(answers["png"], classes),
                               atol=1e-5)
    assert (trained["label"].tolist() == champion["labels"])


def test_a_bad_request_is_a_400_that_names_the_problem_and_serving_goes_on(champion, server):
    images = champion["images"][:2]
    cases = [
        ({"inputs": (images / 255.0).tolist()}, "pixels must be integers 0-255"),
        ({"inputs": np.repeat(images, 2, axis=-1).tolist()}, "images have 2 channels"),
        ({"dataframe_split": {"columns": ["image"],
                              "data": [[base64.b64encode(b"GIF89a, not quite").decode()]]}},
         "image 0: cannot decode"),
    ]
    for body, expected in cases:
        status, reply = _post(server, body)
        assert status == 400, (expected, status, reply)
        assert expected in reply.get("message", ""), reply
    status, reply = _post(server, {"inputs": images.tolist()})
    assert status == 200 and len(reply["predictions"]) == 2


def test_the_pyfunc_reads_digits_at_their_own_size_and_at_another(champion):
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    digits = champion["images"][..., 0]  # [N, 28, 28]: as the dataset stores them
    labels = np.array(champion["labels"])
    own = model.predict(digits)["label"].to_numpy()
    bigger = np.stack([np.asarray(Image.fromarray(d).resize((56, 56), Image.BICUBIC))
                       for d in digits])
    resized = model.predict(bigger)["label"].to_numpy()
    assert (own == labels).mean() >= 0.9, list(zip(own, labels))
    assert (resized == labels).mean() >= 0.85, list(zip(resized, labels))


def test_the_registered_version_explains_itself(champion):
    result, info = champion["result"], champion["info"]
    client = MlflowClient()
    version = client.get_model_version(NAME, str(result.registered.version))
    test_acc = result.best_metrics["test_acc"]
    text = version.description
    for needed in ("tf_efficientnet_lite0", f"freeze {result.best_config['model.freeze']}",
                   f"{test_acc:.4f}", info.fingerprint[:12], "became the champion",
                   "mlflow models serve", "mlflow.pyfunc.load_model"):
        assert needed in text, (needed, text)
    assert float(version.tags["test_acc"]) == pytest.approx(test_acc)
    assert "test_test_acc" not in version.tags
    assert version.tags["freeze"] == str(result.best_config["model.freeze"])

    run = client.get_run(result.best_run_id)
    model = mlflow.get_logged_model(run.data.tags["model_uri"].removeprefix("models:/"))
    linked = {m.key for m in model.metrics}
    assert {"val_acc", "val_loss", "test_acc", "test_auc", "test_accuracy_score"} <= linked
    contexts = sorted({t.value for i in run.inputs.dataset_inputs for t in i.tags
                       if t.key == "mlflow.data.context"})
    assert {"training", "validation", "testing"} <= set(contexts)
    assert run.data.tags["mlflow_evaluate"].startswith("mlflow.models.evaluate on the")
    artifacts = {a.path for a in client.list_artifacts(result.best_run_id)}
    assert {"test_predictions.csv", "test_confusion_matrix.png",  # MLflow's evaluation
            "per_class_metrics.csv"} <= artifacts, artifacts
