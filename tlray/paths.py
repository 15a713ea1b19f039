"""Where tlray keeps things by default: one root, `$TLRAY_HOME` (default `~/.tlray`).

Everything defaults to absolute paths under this root so that a job started by
`ray job submit` (whose working directory is a temporary copy) writes where the user can
find it afterwards. Each location can still be overridden on its own.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The root directory for tlray's datasets, MLflow store, caches and Ray results."""
    return Path(os.environ.get("TLRAY_HOME", Path.home() / ".tlray")).expanduser().resolve()


def datasets_dir() -> Path:
    """Where named datasets (e.g. the built-in MNIST subset) are prepared by default."""
    return home() / "datasets"


def cache_dir() -> Path:
    """Converted weights and other derived files that can always be rebuilt."""
    return home() / "cache"


def ray_results_dir() -> str:
    """Default Ray Train/Tune storage path: `$TLRAY_STORAGE` (e.g. s3://bucket/ray_results,
    which a multi-node cluster needs: every node must reach every checkpoint), else local."""
    return os.environ.get("TLRAY_STORAGE") or str(home() / "ray_results")
