"""The columns of the model's answer, named once for the pyfunc that writes them and for
everything that reads them (`tlray predict`, training's test predictions). Import-free: it
ships inside every logged model, and a reader need not import torch to know the names."""

from __future__ import annotations

IMAGE_COLUMN = "image"  # encoded images in a DataFrame handed to the model
LABEL_COLUMN = "label"  # the predicted class name
PROB_PREFIX = "prob_"  # then one probability column per class: prob_<class>


def probability_columns(class_names: list[str]) -> list[str]:
    return [f"{PROB_PREFIX}{name}" for name in class_names]
