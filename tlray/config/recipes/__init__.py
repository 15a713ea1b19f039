"""Recipes: a job's settings as a YAML file a person reads, copies and changes (torchtune's
`recipes/configs`), every choice with a comment saying what it bought, as measured.

`mnist.yaml` is `jobs/tune_mnist.py`'s (EfficientNet-Lite0 on digits, swept to a 2-minute
budget on a laptop), `malaria.yaml` is `jobs/tune_malaria.py`'s (the NIH cells, as the
original trained them, and more). `tlray recipes show NAME > mine.yaml` starts your own, and
`--config mine.yaml` runs it (any run command, any job script).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tlray.errors import TlrayError

NAMES = ("mnist", "malaria")


def path(name: str) -> Path:
    """The YAML file of recipe `name`."""
    if name not in NAMES:
        raise TlrayError(f"no recipe {name!r}; the recipes are {', '.join(NAMES)}")
    return Path(str(resources.files(__name__) / f"{name}.yaml"))


def text(name: str) -> str:
    return path(name).read_text()
