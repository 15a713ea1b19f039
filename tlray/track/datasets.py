"""The datasets a run used, as MLflow records them: each split by name, fingerprint and
folder (metadata only, no rows copied), in the UI's Datasets column."""

from __future__ import annotations

from typing import Any

import mlflow

# A run's splits as MLflow calls them (the UI's Datasets column shows the context).
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


def split_dataset(info: Any, split: str) -> Any:
    """One split of a prepared dataset as an MLflow dataset (metadata only, no rows copied).

    Named `<dataset>-<split>`, with the dataset's fingerprint as its digest (the run's
    `dataset_hash` tag, shortened) and the split's folder as its source.
    """
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types.schema import ColSpec, Schema

    with warnings.catch_warnings():  # "can be interpreted in multiple ways" for local paths
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(f"{info.uri.rstrip('/')}/{split}")
    schema = Schema([ColSpec("binary", "image"), ColSpec("long", "label"),
                     ColSpec("string", "id")])
    return MetaDataset(source, name=f"{info.name}-{split}", digest=info.fingerprint[:12],
                       schema=schema)


def log_datasets(info: Any, splits: tuple[str, ...] = tuple(SPLIT_CONTEXTS)) -> dict[str, Any]:
    """Record which splits the active run trained, validated and tested on.

    Returns:
        split -> the MLflow dataset, e.g. to link the test metrics to the test split.
    """
    datasets = {split: split_dataset(info, split) for split in splits}
    mlflow.log_inputs(datasets=list(datasets.values()),
                      contexts=[SPLIT_CONTEXTS[s] for s in splits],
                      tags_list=[{"rows": str(info.splits[s].rows)} for s in splits])
    return datasets
