"""The deployable model: raw images in, the predicted class and every class's probability out.

What tlray logs and registers is an MLflow pyfunc model logged from code
(`tlray/serving_model.py` makes an `ImageClassifier`); the network exported with
torch.export (no pickle) is its artifact, and the preprocessing it was trained with is its
model config. So `mlflow.pyfunc.load_model(uri).predict(...)` and `mlflow models serve` take
images as a person has them:

  - pixels: a uint8 array [N, H, W] or [N, H, W, C] (C = 1 grey, 3 RGB, 4 RGBA), any size;
    over HTTP `{"inputs": [...]}` with integers 0-255;
  - encoded images (PNG, JPEG, BMP, ...): bytes, or base64 text, in a DataFrame column
    `image`; over HTTP `{"dataframe_split": {"columns": ["image"], "data": [["iVBOR..."]]}}`;
  - a list (or 1-D object array) of such items, one image each; sizes may differ.

Each image is converted to the network's channels and then resized and normalised by
`tlray.data.preprocess`, the code training used. The answer is a DataFrame with `label` (the
class name) and one `prob_<class>` column per class. Input that is not an image raises an
`MlflowException` with INVALID_PARAMETER_VALUE, which MLflow's scoring server answers with
HTTP 400 and the message, and goes on serving.

Imports only torch, numpy, pandas, Pillow and mlflow (see `tlray.data.preprocess`).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from PIL import Image

from tlray.data.preprocess import (
    MODES,
    to_channels,
    to_mode,
    to_model_input,
    tta_probabilities,
)
from tlray.serve.columns import (  # noqa: F401  (the names, for this module's users)
    IMAGE_COLUMN,
    LABEL_COLUMN,
    PROB_PREFIX,
    probability_columns,
)

NETWORK = "network"  # the artifact: a folder holding the exported network, model.pt2
NETWORK_FILE = "model.pt2"
BATCH = 256  # images per forward pass: memory stays bounded for any request size
_CHANNELS = (1, 3, 4)


def bad_input(message: str) -> MlflowException:
    """An error about the request, not the model: HTTP 400 from MLflow's scoring server."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class ImageClassifier(PythonModel):
    """A trained tlray network with the preprocessing it was trained with."""

    def load_context(self, context) -> None:
        config = context.model_config
        self.class_names = [str(name) for name in config["class_names"]]
        self.channels = int(config["channels"])
        self.size = tuple(int(s) for s in config["size"])
        self.mean = tuple(float(m) for m in config["mean"])
        self.std = tuple(float(s) for s in config["std"])
        self.tta = str(config.get("tta", "none"))  # averaged as the test split was
        # The network is exported from CPU weights; a loader may ask for another device
        # (`tlray predict --gpu`). Models logged before the setting existed run on the CPU.
        self.device = torch.device(str(config.get("device", "cpu")))
        path = Path(context.artifacts[NETWORK]) / NETWORK_FILE
        self.network = torch.export.load(str(path)).module().to(self.device)

    # With the model's signature (a tensor of objects) MLflow hands over an array; the hint
    # is one of those MLflow makes no signature of its own from.
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        images = read_images(model_input, self.channels)
        return answer(self.probabilities(images), self.class_names)

    @torch.no_grad()
    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """Softmax of the network, [N, classes] float32; images of one size go together."""
        out = np.zeros((len(images), len(self.class_names)), np.float32)
        by_shape: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(i)
        for members in by_shape.values():
            for start in range(0, len(members), BATCH):
                rows = members[start:start + BATCH]
                batch = torch.from_numpy(np.stack([images[i] for i in rows])).to(self.device)
                x = to_model_input(batch, self.mean, self.std, self.size)
                out[rows] = tta_probabilities(self.network, x, self.tta).cpu().numpy()
        return out


def answer(probs: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """The model's output: predicted class name, then each class's probability."""
    labels = [class_names[k] for k in probs.argmax(axis=1)] if len(probs) else []
    return pd.DataFrame({LABEL_COLUMN: pd.Series(labels, dtype=object),
                         **{col: probs[:, k].astype(np.float64)
                            for k, col in enumerate(probability_columns(class_names))}})


def read_images(model_input, channels: int) -> list[np.ndarray]:
    """Whatever `predict` was given, as uint8 [H, W, channels] arrays, one per image.

    MLflow hands a DataFrame's single column over as a 1-D object array (the signature is a
    tensor of objects, see `tlray.serve.log_model`), and JSON `inputs` as an object array of
    Python numbers.
    """
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN in model_input.columns:
            model_input = model_input[IMAGE_COLUMN]
        elif len(model_input.columns) == 1:
            model_input = model_input.iloc[:, 0]
        else:
            raise bad_input(f"expected a DataFrame with an {IMAGE_COLUMN!r} column of encoded "
                            f"images, got columns {list(model_input.columns)}")
    if isinstance(model_input, (pd.Series, list, tuple)):
        return [_one_image(item, i, channels) for i, item in enumerate(model_input)]
    if not isinstance(model_input, np.ndarray):
        raise bad_input(f"expected images: a uint8 array [N, H, W(, C)], encoded images "
                        f"(bytes or base64) in a column {IMAGE_COLUMN!r}, or a 1-D object "
                        f"array of them; got {type(model_input).__name__}")
    if model_input.dtype == object and model_input.ndim == 1:
        return [_one_image(item, i, channels) for i, item in enumerate(model_input)]
    return list(to_channels(_pixels(model_input, "the batch", batch=True), channels))


def _one_image(item, index: int, channels: int) -> np.ndarray:
    what = f"image {index}"
    if isinstance(item, str):
        try:
            item = base64.b64decode(item)  # MLflow's own encoding wraps lines: not validate=True
        except (binascii.Error, ValueError):
            raise bad_input(f"{what}: text that is not base64 (expected a base64-encoded PNG, "
                            f"JPEG or other image file)") from None
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _decode(bytes(item), what, channels)
    if isinstance(item, (np.ndarray, list, tuple)):
        return to_channels(_pixels(np.asarray(item), what, batch=False), channels)
    raise bad_input(f"{what}: expected encoded image bytes, base64 text or a uint8 pixel "
                    f"array, got {type(item).__name__}")


def _decode(data: bytes, what: str, channels: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            pixels = to_mode(im, MODES[channels])
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise bad_input(f"{what}: cannot decode {len(data)} bytes as an image ({e})") from None
    return pixels if pixels.ndim == 3 else pixels[..., None]


def _pixels(array: np.ndarray, what: str, *, batch: bool) -> np.ndarray:
    """uint8 pixels with a channel axis, checked: shape, channel count, integer values 0-255."""
    if array.dtype == object:  # parsed JSON: let numpy find out whether they are all integers
        array = np.array(array.tolist())
    ndim = array.ndim - (1 if batch else 0)
    expected = "[N, H, W] or [N, H, W, C]" if batch else "[H, W] or [H, W, C]"
    if ndim not in (2, 3):
        raise bad_input(f"{what}: pixels must have shape {expected}, got shape "
                        f"{list(array.shape)}")
    if ndim == 2:
        array = array[..., None]
    if array.shape[-1] not in _CHANNELS:
        raise bad_input(f"{what}: images have {array.shape[-1]} channels (shape "
                        f"{list(array.shape)}); expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    if array.dtype.kind not in "ui":
        raise bad_input(f"{what}: pixels must be integers 0-255 (uint8), got dtype "
                        f"{array.dtype} (send raw pixels, not normalised floats)")
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise bad_input(f"{what}: pixel values must lie in 0-255, got {array.min()} to "
                            f"{array.max()}")
        array = array.astype(np.uint8)
    if 0 in array.shape[-3:-1]:
        raise bad_input(f"{what}: an image has no pixels (shape {list(array.shape)})")
    return np.ascontiguousarray(array)
