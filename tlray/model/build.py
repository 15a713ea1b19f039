"""Backbones: a timm model (or the malaria original's scratch CNN) with a new head, partly frozen.

Every task is single-label classification with ``num_classes >= 2`` outputs trained with softmax
cross-entropy, binary tasks included: one code path for loss, metrics and prediction. Where the
malaria original used one sigmoid unit, tlray uses two logits, and its AUC is computed from the
softmax probability of class 1.

The model is frozen here (`tlray.model.freeze`), before the caller wraps it in DDP. Heads live
in `tlray.model.heads`, the scratch CNN in `tlray.model.scratch`, weight sources in
`tlray.model.weights`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import timm
import torch
from timm.data import resolve_data_config
from torch import Tensor, nn

from tlray.errors import TlrayError
from tlray.model.backbone_names import check_backbone
from tlray.model.freeze import Freeze, GroupInfo, freeze_groups, group_sizes, model_groups, \
    resolve_freeze
from tlray.model.heads import attach_mlp_head, zero_output_layer
from tlray.model.scratch import SCRATCH_CNN, ScratchCNN
from tlray.model.weights import create_timm_model, parse_weights

HeadKind = Literal["linear", "mlp"]


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
        attach_mlp_head(model, backbone, num_classes, source_head)
    if head_init == "zero" and not source_head:
        zero_output_layer(model)

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


def _create_timm(
    backbone: str,
    num_classes: int,
    in_chans: int,
    size: tuple[int, int] | None,
    weights: str,
    drop_rate: float,
) -> tuple[nn.Module, dict[str, Tensor]]:
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans,
                              **_fixed_input_size(backbone, size)}
    if drop_rate:
        kwargs["drop_rate"] = drop_rate
    try:
        return create_timm_model(backbone, weights, **kwargs)
    except TypeError as e:
        raise TlrayError(f"backbone {backbone} does not accept these options ({e})") from e


def _fixed_input_size(backbone: str, size: tuple[int, int] | None) -> dict[str, Any]:
    """``img_size`` for a timm model whose input size is fixed (ViTs); others take any size."""
    cfg = timm.models.get_pretrained_cfg(backbone)
    return {"img_size": size} if size is not None and cfg is not None and cfg.fixed_input_size \
        else {}


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
    (the malaria original's) unless ``img_size`` is given. `build_model` checks a freeze depth
    against it before any weights are downloaded; ``tlray models describe`` prints it.
    """
    check_backbone(backbone)
    size = _size(img_size)
    with torch.device("meta"):
        if backbone == SCRATCH_CNN:
            model: nn.Module = ScratchCNN(2, in_chans, size or (128, 128))
        else:
            model = timm.create_model(backbone, pretrained=False, in_chans=in_chans,
                                      **_fixed_input_size(backbone, size))
    return group_sizes(model)
