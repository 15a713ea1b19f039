"""State dicts in timm layout: read from a file or from a model logged to MLflow (tensors only,
never unpickled code), and written atomically as safetensors."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from timm.models import clean_state_dict
from torch import Tensor

from tlray.errors import TlrayError


def read_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or, with ``weights_only=True``, ``.pth``/``.pt``.

    A checkpoint dict holding the state dict under ``"state_dict"`` or ``"model"`` is accepted
    too, and DDP/torch.compile prefixes are stripped (``timm.models.clean_state_dict``).
    """
    p = Path(path).expanduser()
    where = f"file:{path}"
    if not p.exists():
        raise TlrayError(f"weights {where}: {p} does not exist")
    if not p.is_file():
        raise TlrayError(f"weights {where}: {p} is not a file")
    if p.suffix == ".safetensors":
        try:
            return clean_state_dict(safetensors.torch.load_file(str(p), device="cpu"))
        except Exception as e:  # safetensors raises its own (non-public) error type
            raise TlrayError(
                f"weights {where}: {p} is not a readable safetensors file ({e})"
            ) from e
    try:
        loaded = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler raises many types for foreign bytes
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TlrayError(
            f"weights {where}: {p} could not be read as a PyTorch state dict with "
            f"torch.load(weights_only=True) ({type(e).__name__}: {first})"
        ) from e
    return as_state_dict(loaded, where)


def as_state_dict(obj: Any, where: str) -> dict[str, Tensor]:
    """Check that ``obj`` is a state dict (or a checkpoint holding one) and return it."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise TlrayError(
            f"weights {where}: not a state dict; expected a mapping of parameter names to "
            f"tensors (or a checkpoint with a 'state_dict' or 'model' entry), found "
            f"{'an empty mapping' if isinstance(obj, Mapping) else type(obj).__name__}"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        keys = ", ".join(repr(k) for k in list(obj)[:5]) + (", ..." if len(obj) > 5 else "")
        raise TlrayError(
            f"weights {where}: not a state dict; entry {bad[0]!r} is of type "
            f"{type(obj[bad[0]]).__name__}, not a tensor (keys: {keys}); "
            "expected a mapping of parameter names to tensors, or a checkpoint with a "
            "'state_dict' or 'model' entry"
        )
    return clean_state_dict(dict(obj))


def read_mlflow_state_dict(uri: str) -> dict[str, Tensor]:
    """The state dict of a PyTorch model logged to MLflow, read on the CPU.

    tlray logs models with MLflow's default ``pt2`` serialization (``torch.export``). The
    exported program keeps the module's parameter and buffer names, so its ``state_dict`` is
    already in timm layout. The ``.pt2`` file is read with ``torch.export.load`` (tensors
    only, tied to the CPU); models pickled with ``serialization_format="pickle"`` are refused,
    because unpickling them runs arbitrary code.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="tlray-mlflow-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except MlflowException as e:
            raise TlrayError(
                f"weights {uri!r}: MLflow cannot find this model at tracking URI "
                f"{mlflow.get_tracking_uri()} ({e.message}); expected models:/NAME@ALIAS, "
                "models:/NAME/VERSION or runs:/RUN_ID/PATH of a model logged with "
                "mlflow.pytorch.log_model (set MLFLOW_TRACKING_URI to the right store)"
            ) from e
        exported = sorted(local.glob("data/*.pt2")) or sorted(local.rglob("*.pt2"))
        if not exported:
            pickled = sorted(local.rglob("*.pth"))
            why = (
                "it was logged with pickle serialization, which tlray does not load (it runs "
                "arbitrary code); log it with the default pt2 serialization"
                if pickled
                else "it has no data/model.pt2, so it is not a PyTorch model logged by "
                "mlflow.pytorch.log_model"
            )
            raise TlrayError(f"weights {uri!r}: {why}")
        try:
            program = torch.export.load(str(exported[0]))
        except Exception as e:  # torch.export raises a variety of types for a bad archive
            raise TlrayError(f"weights {uri!r}: {exported[0].name} could not be read ({e})") from e
        return as_state_dict(
            {k: v.detach().to("cpu") for k, v in program.state_dict.items()}, uri
        )


def save_safetensors_atomic(tensors: Mapping[str, Tensor], path: Path) -> None:
    """Write a safetensors file via a temporary sibling and a rename, so no reader sees half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # Cloning breaks shared storage (tied weights), which safetensors refuses to save.
        safetensors.torch.save_file(
            {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}, tmp_name
        )
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
