"""Backbones: a timm model (or the malaria original's scratch CNN) with a new head, partly frozen.

Every task is single-label classification with ``num_classes >= 2`` outputs trained with softmax
cross-entropy, binary tasks included: one code path for loss, metrics and prediction. Where the
malaria original used one sigmoid unit, tlray uses two logits, and its AUC is computed from the
softmax probability of class 1.

Freeze depth counts timm's coarse parameter groups (``model.group_matcher(coarse=True)``), stem
first, with the classifier excluded: ``0`` trains everything, ``k`` freezes the first ``k`` groups
(their BatchNorm statistics too, via ``timm.utils.freeze``), ``"all"`` trains only the head.
Freezing happens here, before the caller wraps the model in DDP.
"""

from __future__ import annotations

import difflib
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import timm
import torch
from timm.data import resolve_data_config
from timm.models import group_parameters
from timm.utils import freeze as timm_freeze
from timm.utils import unfreeze as timm_unfreeze
from torch import Tensor, nn

from tlray.errors import TlrayError
from tlray.model.weights import classifier_names, create_timm_model, parse_weights

SCRATCH_CNN = "scratch_cnn"
HeadKind = Literal["linear", "mlp"]
Freeze = int | str


@dataclass(frozen=True)
class GroupInfo:
    """One coarse parameter group: freeze depth ``index + 1`` is the first that freezes it."""

    index: int
    name: str
    n_params: int


@dataclass(frozen=True)
class ModelInfo:
    """What the caller needs to feed, train and log a model from `build_model`.

    Attributes:
        backbone: The backbone name as given.
        num_classes: Output logits (2 for binary tasks).
        in_chans: Input channels the model takes.
        head: "linear" or "mlp".
        weights: The weight spec string the model started from.
        data_config: timm's data config (input_size, interpolation, mean, std, crop_pct,
            crop_mode) for these weights, with mean/std fitted to ``in_chans``.
        group_names: Coarse parameter groups, stem first, classifier excluded.
        freeze_depth: How many of those groups are frozen.
        trainable_params: Parameters that train.
        total_params: All parameters, counted before freezing.
    """

    backbone: str
    num_classes: int
    in_chans: int
    head: str
    weights: str
    data_config: dict[str, Any]
    group_names: tuple[str, ...]
    freeze_depth: int
    trainable_params: int
    total_params: int


class MLPHead(nn.Sequential):
    """The malaria original's transfer head: dense 256 ReLU, dropout 0.4, dense 128 ReLU, output."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(
            OrderedDict(
                fc1=nn.Linear(in_features, 256),
                act1=nn.ReLU(inplace=True),
                drop=nn.Dropout(0.4),
                fc2=nn.Linear(256, 128),
                act2=nn.ReLU(inplace=True),
                fc3=nn.Linear(128, num_classes),
            )
        )


class ScratchCNN(nn.Module):
    """The malaria original's from-scratch baseline, for any input size and channel count.

    Three blocks of 3x3 same-padded conv (64, 128, 256) + ReLU + 2x2 max-pool, then dropout
    0.1, dense 512 ReLU, dropout 0.3, dense 512 ReLU and a linear classifier. It carries a
    timm-style ``pretrained_cfg`` and ``group_matcher`` so freezing, data config and weight
    handling treat it like any timm model. Inputs are scaled to [0, 1] (mean 0, std 1), as in
    the original.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, img_size: tuple[int, int] = (128, 128)):
        super().__init__()
        height, width = img_size
        channels = (in_chans, 64, 128, 256)
        blocks = []
        for c_in, c_out in zip(channels, channels[1:]):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            height, width = height // 2, width // 2
        if height < 1 or width < 1:
            raise TlrayError(f"{SCRATCH_CNN}: img_size {img_size} is too small; need at least 8x8")
        self.features = nn.Sequential(*blocks)
        self.dense = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.1),
            nn.Linear(256 * height * width, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(512, num_classes)
        self.num_classes = num_classes
        self.pretrained_cfg: dict[str, Any] = {
            "architecture": SCRATCH_CNN,
            "input_size": (in_chans, *img_size),
            "interpolation": "bilinear",
            "mean": (0.0,) * in_chans,
            "std": (1.0,) * in_chans,
            "crop_pct": 1.0,
            "crop_mode": "center",
            "num_classes": num_classes,
            "first_conv": "features.0.0",
            "classifier": "classifier",
        }

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm-style groups: the first conv block (stem), the other two, the dense layers."""
        return {"stem": r"^features\.0\.", "blocks": r"^features\.(\d+)", "dense": r"^dense"}

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward_features(self, x: Tensor) -> Tensor:
        return self.dense(self.features(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def build_model(
    backbone: str,
    num_classes: int,
    *,
    in_chans: int = 3,
    img_size: int | tuple[int, int] | None = None,
    weights: str = "packaged",
    head: HeadKind = "linear",
    freeze: Freeze = 0,
    drop_rate: float = 0.0,
    head_init: str = "timm",
) -> tuple[nn.Module, ModelInfo]:
    """Create a backbone with a new ``num_classes``-way head, starting weights and frozen groups.

    Binary tasks use ``num_classes=2`` with softmax + cross-entropy (one code path for every
    task); their AUC comes from the softmax probability of class 1.

    Args:
        backbone: A timm model name (any of ``timm.list_models()``, optionally with a pretrained
            tag) or ``"scratch_cnn"``.
        num_classes: Number of classes, at least 2.
        in_chans: Input channels. With 1 (grey data), timm sums the pretrained stem over its RGB
            channels (``adapt_input_conv``) and mean/std become the mean of the three.
        img_size: Input height/width. Required for ``scratch_cnn`` (its dense layer depends on
            it) and passed to timm models with a fixed input size (ViTs); otherwise it only
            sets ``data_config["input_size"]``.
        weights: Where the starting weights come from; see `tlray.model.weights`.
        head: ``"linear"``, or ``"mlp"`` for the malaria original's dense 256/128 head.
        freeze: Coarse groups to freeze: an int, a numeric string, or ``"all"`` (head only).
        drop_rate: timm's dropout before the classifier (ignored by ``scratch_cnn``, which has
            the original's fixed dropouts).
        head_init: ``"timm"`` (the model's own init) or ``"zero"`` (the output layer at 0).

    Returns:
        The model (in train mode, on the CPU, not DDP-wrapped) and its `ModelInfo`.

    Raises:
        TlrayError: For an unknown backbone, weights that cannot be loaded or do not fit, a
            freeze depth beyond the backbone's groups, or any other invalid option.
    """
    _check_options(num_classes, in_chans, head, drop_rate)
    spec = parse_weights(weights)
    size = _size(img_size)
    check_backbone(backbone)
    if backbone == SCRATCH_CNN:
        if spec.kind != "none":
            raise TlrayError(
                f"weights {spec.spec!r}: {SCRATCH_CNN} trains from scratch; use --weights none"
            )
        if size is None:
            raise TlrayError(f"{SCRATCH_CNN} needs img_size (its dense layer size depends on it)")
    # Checked on a weightless skeleton first, so a bad depth never waits for a download.
    skeleton_groups = describe_backbone(backbone, in_chans=in_chans, img_size=size)
    depth = resolve_freeze(freeze, backbone, [g.name for g in skeleton_groups])

    if backbone == SCRATCH_CNN:
        model: nn.Module = ScratchCNN(num_classes, in_chans, size)
        source_head: dict[str, Tensor] = {}
    else:
        model, source_head = _create_timm(
            backbone, num_classes, in_chans, size, spec.spec, drop_rate
        )
    if head == "mlp":
        _attach_mlp_head(model, backbone, num_classes, source_head)
    if head_init == "zero" and not source_head:
        _zero_output_layer(model)

    groups = model_groups(model)
    total = sum(p.numel() for p in model.parameters())
    freeze_groups(model, [names for _, names in groups[:depth]])
    info = ModelInfo(
        backbone=backbone,
        num_classes=num_classes,
        in_chans=in_chans,
        head=head,
        weights=spec.spec,
        data_config=data_config(model, in_chans, size),
        group_names=tuple(name for name, _ in groups),
        freeze_depth=depth,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=total,
    )
    return model, info


def build_for_run(cfg, info, *, weights: str | None = None, freeze: str | None = None
                  ) -> tuple[nn.Module, ModelInfo]:
    """The model a run's config asks for, on a dataset's classes and channels.

    Args:
        cfg: a `tlray.config.Config`.
        info: the `tlray.data.dataset.DatasetInfo` it trains on.
        weights: instead of `model.weights` (e.g. "none" for an architecture whose weights a
            checkpoint replaces).
        freeze: instead of the first phase's depth of `model.freeze`.
    """
    from tlray.config.schedule import first_depth

    return build_model(cfg.model.backbone, info.num_classes, in_chans=info.channels,
                       img_size=cfg.data.image_size, weights=weights or cfg.model.weights,
                       head=cfg.model.head, freeze=freeze or first_depth(cfg.model.freeze),
                       drop_rate=cfg.model.drop_rate, head_init=cfg.model.head_init)


def _zero_output_layer(model: nn.Module) -> None:
    """The new head's last linear layer at zero (Big Transfer's head init): every class
    starts equally likely, so the first steps' gradients are the features' and not a random
    layer's large logits (timm's init for efficientnet's classifier starts the digits near
    a loss of 8, with a frozen backbone near 20)."""
    layers = [m for m in model.get_classifier().modules() if isinstance(m, nn.Linear)]
    if layers:
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)


def _check_options(num_classes: int, in_chans: int, head: str, drop_rate: float) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise TlrayError(
            f"num_classes: expected an int >= 2 (binary tasks use 2 classes with softmax), "
            f"got {num_classes!r}"
        )
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise TlrayError(
            f"in_chans: expected a positive int (1 for grey, 3 for RGB), got {in_chans!r}"
        )
    if head not in ("linear", "mlp"):
        raise TlrayError(f"head: expected 'linear' or 'mlp', got {head!r}")
    if not 0.0 <= float(drop_rate) < 1.0:
        raise TlrayError(f"drop_rate: expected a number in [0, 1), got {drop_rate!r}")


def _size(img_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if img_size is None:
        return None
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise TlrayError(f"img_size: expected a positive int or (height, width), got {img_size!r}")
    return size  # type: ignore[return-value]


def check_backbone(backbone: str) -> None:
    """Reject an unknown backbone name, suggesting close timm names."""
    if backbone == SCRATCH_CNN:
        return
    if isinstance(backbone, str) and timm.is_model(backbone):
        try:
            known_tag = timm.models.get_pretrained_cfg(backbone) is not None or "." not in backbone
        except RuntimeError:  # timm raises for a tag it does not know
            known_tag = False
        if not known_tag:
            arch = backbone.split(".", 1)[0]
            tags = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
            raise TlrayError(
                f"backbone: {backbone!r} has an unknown pretrained tag; timm knows {tags}"
            )
        return
    close = suggest_backbones(str(backbone), [SCRATCH_CNN, *timm.list_models()])
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise TlrayError(
        f"backbone: unknown model {backbone!r}{hint} (expected a timm model name, see "
        f"timm.list_models(), or {SCRATCH_CNN!r})"
    )


# Characters people mistype for each other in model names: O for 0, l and I for 1.
_LOOKALIKES = str.maketrans({"o": "0", "l": "1", "i": "1"})


def suggest_backbones(name: str, known: Sequence[str], n: int = 5) -> list[str]:
    """The known names closest to `name`: those equal to it once case and look-alike
    characters (0/O, 1/l/I) are folded first, then the closest by edit similarity."""
    def fold(text: str) -> str:
        return text.lower().translate(_LOOKALIKES)

    folded = {}
    for candidate in known:
        folded.setdefault(fold(candidate), []).append(candidate)
    exact = folded.get(fold(name), [])
    close = difflib.get_close_matches(fold(name), list(folded), n=n, cutoff=0.6)
    ranked = exact + [c for key in close for c in folded[key] if c not in exact]
    return ranked[:n]


def _create_timm(
    backbone: str,
    num_classes: int,
    in_chans: int,
    size: tuple[int, int] | None,
    weights: str,
    drop_rate: float,
) -> tuple[nn.Module, dict[str, Tensor]]:
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    if drop_rate:
        kwargs["drop_rate"] = drop_rate
    cfg = timm.models.get_pretrained_cfg(backbone)
    if size is not None and cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = size
    try:
        return create_timm_model(backbone, weights, **kwargs)
    except TypeError as e:
        raise TlrayError(f"backbone {backbone} does not accept these options ({e})") from e


def _attach_mlp_head(
    model: nn.Module, backbone: str, num_classes: int, source_head: Mapping[str, Tensor]
) -> None:
    """Swap the linear classifier for `MLPHead`, reusing the source's MLP head when it fits."""
    names = classifier_names(model)
    classifier = model.get_submodule(names[0]) if len(names) == 1 else None
    if not isinstance(classifier, nn.Linear):
        raise TlrayError(
            f"head 'mlp' needs a single linear classifier, which {backbone} does not have "
            f"({', '.join(names) or 'none'}); use head 'linear'"
        )
    mlp = MLPHead(classifier.in_features, num_classes)
    expected = mlp.state_dict()
    fits = set(source_head) == set(expected) and all(
        source_head[k].shape == v.shape for k, v in expected.items()
    )
    if fits:
        mlp.load_state_dict(source_head)
    model.set_submodule(names[0], mlp)


def model_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """timm's coarse parameter groups in order, classifier excluded, each with a readable name.

    Returns:
        ``(name, parameter names)`` per group, stem first. A model without a ``group_matcher``
        has no groups (only freeze 0 is possible).
    """
    try:
        matcher = model.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError):
        return []
    head = tuple(f"{name}." for name in classifier_names(model))
    grouped = group_parameters(model, matcher)
    groups = []
    for _, names in sorted(grouped.items()):
        names = [n for n in names if not (head and n.startswith(head))]
        if names:
            groups.append((_group_name(names, matcher), names))
    return groups


def _group_name(param_names: Sequence[str], matcher: Any) -> str:
    """Name a group by what the matcher matched ("blocks.3", "conv_stem+bn1").

    Parameters no pattern matches (e.g. a ConvNeXt's head.norm) are named by their common
    module path.
    """
    parts: list[str] = []
    unmatched: list[list[str]] = []
    for name in param_names:
        part = _matched_prefix(name, matcher) if isinstance(matcher, Mapping) else None
        if part is None:
            unmatched.append(name.split(".")[:-1] or [name])
        elif part not in parts:
            parts.append(part)
    if unmatched:
        parts.append(".".join(os.path.commonprefix(unmatched)) or unmatched[0][0])
    return "+".join(parts)


def _matched_prefix(name: str, matcher: Mapping[str, Any]) -> str | None:
    """The text of the first group_matcher pattern that matches ``name``, in timm's order."""
    for spec in matcher.values():
        if spec is None:
            continue
        patterns = [s[0] for s in spec] if isinstance(spec, (list, tuple)) else [spec]
        for pattern in patterns:
            match = re.match(pattern, name)
            if match:
                return match.group(0).rstrip(".")
    return None


def resolve_freeze(freeze: Freeze, backbone: str, group_names: Sequence[str]) -> int:
    """Turn an int, numeric string or "all" into a freeze depth valid for these groups."""
    n = len(group_names)
    listing = ", ".join(f"{i} {name}" for i, name in enumerate(group_names))
    valid = f"valid values are 0..{n} or 'all' (groups, stem first: {listing})" if n else (
        f"{backbone} has no timm group_matcher, so only 0 is valid"
    )
    if isinstance(freeze, str):
        text = freeze.strip().lower()
        if text == "all" and n:
            return n
        if not text.isdigit():
            raise TlrayError(
                f"freeze: expected an int, a numeric string or 'all', got {freeze!r}; {valid}"
            )
        freeze = int(text)
    if isinstance(freeze, bool) or not isinstance(freeze, int):
        raise TlrayError(f"freeze: expected an int, a numeric string or 'all', got {freeze!r}")
    if not 0 <= freeze <= n:
        raise TlrayError(f"freeze {freeze} is out of range for {backbone}: {valid}")
    return freeze


def freeze_groups(model: nn.Module, groups: Sequence[Sequence[str]]) -> None:
    """Freeze these parameter groups and the BatchNorm statistics inside them, in place.

    Whole modules go through ``timm.utils.freeze`` (BatchNorm becomes FrozenBatchNorm2d);
    parameters owned by a module that is only partly frozen (a ViT's cls_token on the root
    module) just stop requiring gradients.
    """
    modules, loose = group_modules(model, groups)
    if modules:  # (timm reads an empty list as "the whole model")
        timm_freeze(model, modules)
    for name, param in model.named_parameters():
        if name in loose:
            param.requires_grad_(False)


def set_frozen_depth(model: nn.Module, groups: Sequence[Sequence[str]], depth: int) -> None:
    """Freezes the first `depth` groups and unfreezes the others (BatchNorm statistics with
    them), in place: a freeze schedule's phase boundary. `groups` are the parameter names of
    every group as `model_groups` gave them before anything was frozen (a frozen
    BatchNorm's weights are buffers, no longer parameters)."""
    modules, loose = group_modules(model, groups[depth:], frozen_too=True)
    if modules:
        timm_unfreeze(model, modules)
    for name, param in model.named_parameters():
        if name in loose:
            param.requires_grad_(True)
    freeze_groups(model, groups[:depth])


def group_modules(model: nn.Module, groups: Sequence[Sequence[str]], *,
                  frozen_too: bool = False) -> tuple[list[str], set[str]]:
    """The whole modules that these groups own, and their parameters held by modules they
    share. With `frozen_too`, a frozen BatchNorm's weight and bias (buffers) count as the
    parameters they were."""
    wanted = {name for group in groups for name in group}
    modules: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{m}.") for m in modules):
            continue
        owned = [p for p, _ in module.named_parameters()]
        if frozen_too:
            owned += [b for b, _ in module.named_buffers()
                      if b.rsplit(".", 1)[-1] in ("weight", "bias")]
        owned = [f"{name}.{p}" if name else p for p in owned]
        if owned and all(p in wanted for p in owned):
            modules.append(name)
    covered = tuple(f"{m}." for m in modules)
    return modules, {p for p in wanted if not p.startswith(covered)}


def data_config(
    model: nn.Module, in_chans: int, img_size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """timm's data config for the model's weights, fitted to ``in_chans`` and ``img_size``.

    Grey input gets the mean of the RGB mean/std, matching timm summing the stem's RGB filters.
    """
    config = dict(resolve_data_config(model=model))
    height, width = img_size or tuple(config["input_size"][1:])
    config["input_size"] = (in_chans, height, width)
    config["mean"] = _fit_channels(config["mean"], in_chans)
    config["std"] = _fit_channels(config["std"], in_chans)
    return config


def _fit_channels(values: Sequence[float], in_chans: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if in_chans == 1:
        return (sum(values) / len(values),)
    # More channels than the weights saw: cycle, as adapt_input_conv repeats the RGB filters.
    return tuple(values[i % len(values)] for i in range(in_chans))


def describe_backbone(
    backbone: str, *, in_chans: int = 3, img_size: int | tuple[int, int] | None = None
) -> list[GroupInfo]:
    """The backbone's coarse freeze groups with parameter counts, without allocating weights.

    ``scratch_cnn``'s dense layer depends on the input size; it is described at 128x128
    (the malaria original's) unless ``img_size`` is given.
    """
    check_backbone(backbone)
    size = _size(img_size)
    with torch.device("meta"):
        if backbone == SCRATCH_CNN:
            model: nn.Module = ScratchCNN(2, in_chans, size or (128, 128))
        else:
            cfg = timm.models.get_pretrained_cfg(backbone)
            kwargs = {"img_size": size} if size and cfg is not None and cfg.fixed_input_size else {}
            model = timm.create_model(backbone, pretrained=False, in_chans=in_chans, **kwargs)
    params = dict(model.named_parameters())
    return [
        GroupInfo(i, name, sum(params[n].numel() for n in names))
        for i, (name, names) in enumerate(model_groups(model))
    ]


def format_groups(backbone: str, groups: Sequence[GroupInfo]) -> str:
    """A table of the groups and the valid freeze values, for ``tlray models describe``."""
    if not groups:
        return f"{backbone}: no timm group_matcher; only freeze 0 (train everything) is valid"
    width = max(len("group"), *(len(g.name) for g in groups))
    lines = [
        f"{backbone}: {len(groups)} coarse parameter groups, stem first "
        "(the classifier head always trains)",
        f"{'index':>5}  {'group':<{width}}  {'params':>12}  frozen by",
    ]
    for g in groups:
        lines.append(f"{g.index:>5}  {g.name:<{width}}  {g.n_params:>12,}  freeze >= {g.index + 1}")
    n = len(groups)
    lines.append(
        f"valid freeze values: 0 (train everything) .. {n}, or 'all' (= {n}: train only the head)"
    )
    return "\n".join(lines)
