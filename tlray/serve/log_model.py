"""How a trained network becomes one MLflow model with two faces, both read from one file.

- `python_function`: `tlray.serve.pyfunc.ImageClassifier`, logged from code: raw images in, the
  class and its probabilities out. What `mlflow.pyfunc.load_model`, `mlflow models serve`,
  `mlflow.models.evaluate` and `tlray predict` use.
- `pytorch`: the bare network, float32 NCHW already resized and normalised in, logits out.
  What `mlflow.pytorch.load_model` and `--model.weights=models:/...` use.

The network is exported once with torch.export (`pt2`: a graph and its weights, no pickle)
from a CPU, eval-mode copy, with a dynamic batch dimension. The pyfunc flavor keeps it as
its artifact `network/model.pt2`; the pytorch flavor points at that same folder. The model
also ships tlray's own code (`code/tlray`), so it serves wherever torch, numpy, pandas,
Pillow and mlflow are installed, tlray or not. Load the tensor model with
`mlflow.pytorch.load_model(uri, device="cpu")` and do not call `.eval()` on it (exported
modules refuse it; they already run in eval mode).
"""

from __future__ import annotations

import copy
import io
import logging
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from tlray.data.preprocess import to_model_input
from tlray.errors import TlrayError
from tlray.serve import pyfunc as serving

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # tlray/
MODEL_CODE = PACKAGE_DIR / "serve" / "model_code.py"
# What of tlray a logged model needs to serve, shipped inside it (`code/tlray/`): the pyfunc,
# the preprocessing it shares with training, and the (import-free) package files above them.
SHIPPED_MODULES = ("__init__.py", "data/__init__.py", "data/preprocess.py", "data/pixels.py",
                   "serve/__init__.py", "serve/columns.py", "serve/pyfunc.py")
REQUIREMENTS = ("torch", "mlflow", "numpy", "pandas", "pillow")

_log = logging.getLogger(__name__)


def log_model(network: torch.nn.Module, example_images: np.ndarray, class_names: list[str],
              preprocess: Mapping[str, Any], *, name: str = "model",
              metadata: Mapping[str, Any] | None = None) -> Any:
    """Logs `network` with its preprocessing under the active run; returns MLflow's ModelInfo.

    Args:
        network: the classifier (DDP / compiled wrappers are unwrapped; the caller's module,
            maybe on a GPU and in train mode, is left as it is).
        example_images: two or more uint8 [N, H, W, C] images, as the dataset stores them:
            the input example (as PNGs) and the export's example (preprocessed).
        class_names: the label of each output logit, in order.
        preprocess: {"mean", "std", "size": [h, w], "channels"}: what training fed the network,
            and "tta" (none, flip, dihedral): the test-time augmentation the answers average.
        metadata: more MLmodel metadata (tlray adds class_names and preprocess).

    Link metrics to it with `tlray.track.run_metrics.link_metrics`, or log them with its
    `model_id`.
    """
    if mlflow.active_run() is None:
        raise RuntimeError("logged_model.log_model needs an active run: call it inside "
                           "tlray.track.runs.start_run()")
    images = np.asarray(example_images)
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) < 1:
        raise TlrayError(f"example_images has shape {images.shape} and dtype {images.dtype}: "
                         f"expected uint8 images [N, H, W, C]")
    images = np.concatenate([images, images])[:2] if len(images) < 2 else images[:2]
    pre = {"mean": [float(m) for m in preprocess["mean"]],
           "std": [float(s) for s in preprocess["std"]],
           "size": [int(s) for s in preprocess["size"]],
           "channels": int(preprocess["channels"]),
           "tta": str(preprocess.get("tta", "none"))}
    # "device" is here so that a loader can override it (`mlflow.pyfunc.load_model(uri,
    # model_config={"device": "cuda"})`: MLflow overrides only keys the logged config has).
    config = {"class_names": [str(c) for c in class_names], **pre, "device": "cpu"}
    cpu = copy.deepcopy(_unwrap(network)).to("cpu").eval()
    tensors = to_model_input(torch.from_numpy(images.copy()), pre["mean"], pre["std"],
                             pre["size"])
    with torch.no_grad():
        logits = cpu(tensors)
    if logits.ndim != 2 or logits.shape[1] != len(class_names):
        raise TlrayError(f"the model outputs shape {tuple(logits.shape)} but "
                         f"{len(class_names)} class names were given: expected logits of shape "
                         f"(batch, number of classes)")
    return mlflow.models.Model.log(
        artifact_path=None, name=name, flavor=sys.modules[__name__], flavor_name="python_function",
        # MLflow links every run metric logged at `step` to the model, system metrics too;
        # no metric has step -1: run_metrics.link_metrics links the chosen ones.
        step=-1,
        metadata={"class_names": config["class_names"], "preprocess": pre,
                  "input": "images: uint8 [N, H, W(, C)] pixels, or encoded image bytes / "
                           "base64 in a column 'image'",
                  "output": "label, prob_<class> per class",
                  **dict(metadata or {})},
        network=cpu, tensor_example=tensors, example_images=images, model_config=config,
        # MLflow would load the saved model again and serve it the input example: 2 s per
        # model (a trial's), for a warning at most. `evaluate` serves it the whole test split
        # (PNG bytes, as a client posts them) and says so on the run where that went wrong.
        validate_serving_input=False)


def save_model(path: str, mlflow_model: mlflow.models.Model, *, network: torch.nn.Module,
               tensor_example: torch.Tensor, example_images: np.ndarray,
               model_config: dict, validate_serving_input: bool = True) -> None:
    """`Model.log`'s flavor hook: writes the model directory at `path` (Model.log hands on
    its own `validate_serving_input` too)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    # Batch dimension exported as dynamic; torch.export needs an example batch of >= 2 for it.
    program = torch.export.export(network, (tensor_example,),
                                  dynamic_shapes=({0: torch.export.Dim.AUTO},))
    class_names = model_config["class_names"]
    signature = ModelSignature(
        # One object per image: pixels, encoded bytes or base64 text. A tensor of objects is
        # the only input schema MLflow lets through with all three (see tlray.serve.pyfunc).
        inputs=Schema([TensorSpec(np.dtype(object), (-1,))]),
        outputs=Schema([ColSpec("string", serving.LABEL_COLUMN)]
                       + [ColSpec("double", c) for c in serving.probability_columns(class_names)]))
    with tempfile.TemporaryDirectory(prefix="tlray-model-") as tmp:
        folder = Path(tmp) / serving.NETWORK
        folder.mkdir()
        torch.export.save(program, str(folder / serving.NETWORK_FILE))
        package = Path(tmp) / "tlray"
        package.mkdir()
        for module in SHIPPED_MODULES:
            (package / module).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(PACKAGE_DIR / module, package / module)
        mlflow.pyfunc.save_model(
            path, python_model=str(MODEL_CODE), artifacts={serving.NETWORK: str(folder)},
            code_paths=[str(package)], model_config=model_config, signature=signature,
            input_example=pd.DataFrame({serving.IMAGE_COLUMN: [png(im) for im in example_images]}),
            pip_requirements=pip_requirements(), mlflow_model=mlflow_model)
    network_dir = mlflow_model.flavors["python_function"]["artifacts"][serving.NETWORK]["path"]
    mlflow_model.add_flavor("pytorch", model_data=network_dir,
                            pytorch_version=str(torch.__version__), code=None)
    mlflow_model.save(str(Path(path) / "MLmodel"))


def png(image: np.ndarray) -> bytes:
    """One uint8 [H, W, C] image as PNG bytes (what a person would post to the server)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def pip_requirements() -> list[str]:
    """Pinned requirements of a logged model; explicit because inferring them takes seconds.

    Local version suffixes (`+cu128`) are dropped so the pins resolve on PyPI.
    """
    import importlib.metadata

    pins = []
    for package in REQUIREMENTS:
        try:
            pins.append(f"{package}=={importlib.metadata.version(package).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(package)
    return pins


def _unwrap(model: Any) -> Any:
    """The plain module inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def import_evaluators() -> None:
    """Imports MLflow's model evaluators now, before Ray's threads or a run's system-metrics
    thread start.

    Their first import registers them from an import hook that holds MLflow's import-hook
    lock while it imports more modules; another thread's import waits for that lock while
    holding a module lock, and the two can deadlock. Seen: a test hung for good inside
    `mlflow.models.evaluate` (the system-metrics thread looks for pyspark at every sample),
    and a sweep's driver hung for good here, after `ray.init`, against Ray's log-printing
    thread (`filter_autoscaler_events` imports lazily). The same goes for the autologging
    flavors `evaluate` configures: for every library already imported (torch) it imports
    MLflow's flavor module (`mlflow.pytorch`) under that lock (seen: the main job hung for
    good in a sweep trial's `evaluate`), so those are imported now too. ~2 s, once per
    process.
    """
    import importlib

    import mlflow.models.evaluation.evaluator_registry  # noqa: F401
    from mlflow.ml_package_versions import FLAVOR_TO_MODULE_NAME
    from mlflow.utils.autologging_utils import is_autolog_supported

    for flavor, module in FLAVOR_TO_MODULE_NAME.items():
        if module in sys.modules and is_autolog_supported(flavor):
            try:
                importlib.import_module(f"mlflow.{flavor}")
            except Exception:  # noqa: BLE001 - evaluate skips a flavor it cannot import too
                pass


# Test images x model input pixels that the pyfunc evaluates on a CPU in seconds: the
# built-in digits' 500 at 48 px are 3.5M, Kaggle's 4,200 digits 29M.
EVALUATE_MAX_PIXELS = 50_000_000


def evaluate(model_uri: str, model_id: str, info: Any, size: int, mode: str = "auto") -> str:
    """`mlflow.models.evaluate` of the logged pyfunc on the test split; returns what it did.

    The images go in as PNG bytes, as a client would post them, so the whole serving path is
    what is evaluated. MLflow logs its classifier metrics (`test_accuracy_score`,
    `test_f1_score`, ...; linked to the logged model and to the test data) and artifacts
    (`test_per_class_metrics.csv`, `test_confusion_matrix.png`) to the active run.

    Args:
        size: the model's (square) input size, in pixels.
        mode: "auto" (only when the split is small enough for a CPU to take seconds: the
            driver runs it, maybe on a machine without a GPU), "always" or "never".
    """
    if mode == "never":
        return "not run (tracking.evaluate=never)"
    rows = info.splits["test"].rows
    pixels = rows * size * size * info.channels
    if mode == "auto" and pixels > EVALUATE_MAX_PIXELS:
        return (f"not run: {rows} test images at {size}x{size} are too many to evaluate "
                f"in seconds on the driver's CPU (--tracking.evaluate=always runs it); the "
                f"test_* metrics and plots come from the training workers")
    from tlray.data.dataset import iter_split

    encoded, labels = [], []
    for images, label_ids, _ in iter_split(info, "test"):
        encoded += [png(im) for im in images]
        labels += [info.classes[i] for i in label_ids]
    frame = pd.DataFrame({serving.IMAGE_COLUMN: encoded, "label": labels})
    try:
        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways"
            warnings.simplefilter("ignore", UserWarning)
            data = mlflow.data.from_pandas(frame, source=f"{info.uri.rstrip('/')}/test",
                                           name=f"{info.name}-test", targets="label")
        model = mlflow.pyfunc.load_model(model_uri)
        mlflow.models.evaluate(lambda x: model.predict(x)[serving.LABEL_COLUMN], data,
                               model_type="classifier", evaluators="default", model_id=model_id,
                               evaluator_config={"log_model_explainability": False,
                                                 "metric_prefix": "test_",
                                                 "label_list": info.classes})
    except Exception as e:  # noqa: BLE001 - an extra report must not fail a finished run
        _log.warning("mlflow.models.evaluate failed: %s: %s", type(e).__name__, e)
        return f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return f"mlflow.models.evaluate on the {rows} test images, sent as PNGs"
