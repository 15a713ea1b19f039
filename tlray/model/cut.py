"""Cutting a model after its frozen front: `rest(front(x)) == model(x)`, only `rest` trains.

A timm model computes `forward_head(forward_features(x))`, and for the CNN families tlray is
used with (EfficientNet, ResNet, the scratch CNN; tested on each) `forward_features` runs the
model's child modules in the order they were registered. The front is the longest run of
those children (descending into `blocks`-style containers) whose parameters are all frozen
and which hold nothing random (dropout, drop-path, live BatchNorm); when the whole trunk is
frozen and the head has no dropout, global pooling joins the front and only the classifier
trains. Every cut is checked numerically against the whole model before it is used.

The feature cache (`tlray.model.feature_cache`) stores the front's outputs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from tlray.model.weights import classifier_names

_TOLERANCE = 1e-4


@dataclass
class ModelCut:
    """A model cut in two: `rest(front(x)) == model(x)`, and only `rest` has trainable weights.

    `rest` shares its parameters with the model, so training it trains the model.
    """

    front: nn.Module
    rest: nn.Module
    after: str  # the last module of the front, e.g. "blocks.1", or "global_pool"
    shape: tuple[int, ...] = ()  # the front's output for one image, e.g. (24, 12, 12)


class _Rest(nn.Module):
    """The trainable remainder: the trunk modules after the cut, then the model's own head."""

    def __init__(self, units: list[tuple[str, nn.Module]], head: nn.Module):
        super().__init__()
        self.units = nn.Sequential(OrderedDict((n.replace(".", "_"), m) for n, m in units))
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.forward_head(self.units(x))


class NotAChain(Exception):
    """The model's forward is not the chain of its children at the cut: cutting it there
    would change what it computes (it is trained uncached; the message says why)."""


def cut_model(model: nn.Module, input_shape: tuple[int, int, int]) -> ModelCut | None:
    """Cuts `model` after its frozen front; None when it has no frozen front to cache.

    Args:
        model: a model from `tlray.model.build.build_model`, already frozen.
        input_shape: (C, H, W) of its input, for the numerical check of the cut.

    Raises:
        NotAChain: when the front and the rest do not reproduce the whole model.
    """
    if not (hasattr(model, "forward_head") and hasattr(model, "forward_features")):
        raise NotAChain(f"{type(model).__name__} has no forward_features/forward_head to cut "
                        f"between")
    head_names = {*classifier_names(model), "global_pool"}
    if not hasattr(model, "pretrained_cfg"):
        head_names.add("classifier")
    trunk = [(n, m) for n, m in model.named_children() if n not in head_names]
    front: list[tuple[str, nn.Module]] = []
    rest = list(trunk)
    while rest:
        name, unit = rest[0]
        if _cacheable(unit):
            front.append(rest.pop(0))
        elif (isinstance(unit, (nn.Sequential, nn.ModuleList))
              and _cacheable(next(iter(unit), None))):
            rest[0:1] = [(f"{name}.{n}", m) for n, m in unit.named_children()]
        else:
            break
    if not any(p.numel() for _, m in front for p in m.parameters()):
        return None
    if not rest and not getattr(model, "drop_rate", 0) and hasattr(model, "global_pool"):
        front.append(("global_pool", model.global_pool))
        head = model.get_classifier()
    else:
        head = _Rest(rest, _head_view(model, head_names))
    cut = ModelCut(front=nn.Sequential(OrderedDict(
        (n.replace(".", "_"), m) for n, m in front)), rest=head, after=front[-1][0])
    cut.shape = _reproduces(model, cut, input_shape)
    return cut


def _cacheable(module: nn.Module | None) -> bool:
    """Frozen and deterministic: same output for the same input, in train mode too."""
    if module is None or any(p.requires_grad for p in module.parameters()):
        return False
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # live statistics (not frozen)
            return False
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return False
        if float(getattr(m, "drop_prob", 0.0) or 0.0) > 0:  # timm's DropPath
            return False
    return True


def _head_view(model: nn.Module, head_names: set[str]) -> nn.Module:
    """A shallow copy of `model` that owns only its head modules, so that calling its
    `forward_head` runs the model's own head code on the model's own head weights."""
    import copy

    view = copy.copy(model)
    view._modules = OrderedDict((n, m) for n, m in model._modules.items() if n in head_names)
    view._parameters, view._buffers = OrderedDict(), OrderedDict()
    return view


@torch.no_grad()
def _reproduces(model: nn.Module, cut: ModelCut, input_shape: tuple[int, int, int]
                ) -> tuple[int, ...]:
    """The front's output shape, once `rest(front(x))` is checked to equal `model(x)`."""
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
        middle = cut.front(x)
        whole = model(x)
        try:
            rebuilt = cut.rest(middle)
        except RuntimeError as e:  # shapes that do not chain: the forward does more
            raise NotAChain(f"cut after {cut.after}, the rest fails on the front's output "
                            f"({e})") from e
    finally:
        model.train(was_training)
    if whole.shape != rebuilt.shape or not torch.allclose(
            whole, rebuilt, atol=_TOLERANCE * max(1.0, float(whole.abs().max())),
            rtol=_TOLERANCE):
        raise NotAChain(f"cut after {cut.after}, front and rest compute something else than "
                        f"the whole model")
    return tuple(middle.shape[1:])
