"""One batch through the model: every row's answer, or why the row has none.

The model's pyfunc decodes, converts and resizes the images itself (`tlray.serve.pyfunc`);
an image it cannot take fails the whole call, so that batch is then scored image by image to
find which rows it was. A row without an answer is kept with its reason, so that one run names
every bad input.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from tlray.serve.predict_inputs import Batch
from tlray.serve.columns import probability_columns

ERROR_COLUMN = "error"
_IMAGE_PREFIX = re.compile(r"^image \d+: ")  # the pyfunc's way of naming the item


def score(model, batch: Batch, class_names: list[str]) -> pa.Table:
    """id, label (the true class or null), class (predicted), one probability column per
    class, and error (null, or why the row has no answer), one row per row of the batch."""
    columns = probability_columns(class_names)
    probs = np.full((len(batch.ids), len(columns)), np.nan)
    errors: list[str | None] = [batch.failures.get(i) for i in range(len(batch.ids))]
    readable = [i for i in range(len(batch.ids)) if i not in batch.failures]
    if readable:
        answered, bad = _probabilities(model, batch.images, columns)
        probs[readable] = answered
        for k, reason in bad.items():
            errors[readable[k]] = reason
    predicted = [None if error else class_names[int(np.argmax(p))]
                 for p, error in zip(probs, errors)]
    return pa.table({"id": pa.array(batch.ids, pa.string()),
                     "label": pa.array(batch.labels, pa.string()),
                     "class": pa.array(predicted, pa.string()),
                     **{c: probs[:, k] for k, c in enumerate(columns)},
                     ERROR_COLUMN: pa.array(errors, pa.string())})


def _probabilities(model, images, columns: list[str]) -> tuple[np.ndarray, dict[int, str]]:
    """[N, classes] probabilities (NaN where an image was refused) and {position: reason}."""
    try:
        return model.predict(images)[columns].to_numpy(np.float64), {}
    except Exception as e:  # noqa: BLE001 - anything but a refused input is raised again
        if not _refused(e):
            raise
    out, bad = np.full((len(images), len(columns)), np.nan), {}
    for k in range(len(images)):
        try:
            out[k] = model.predict(images[k:k + 1])[columns].to_numpy(np.float64)[0]
        except Exception as e:  # noqa: BLE001
            if not _refused(e):
                raise
            bad[k] = _IMAGE_PREFIX.sub("", str(e).strip().splitlines()[0])
    return out, bad


def _refused(error: Exception) -> bool:
    """The pyfunc's answer to input that is not an image (HTTP 400 when served)."""
    return getattr(error, "error_code", None) == "INVALID_PARAMETER_VALUE"
