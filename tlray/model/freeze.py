"""Freeze groups: timm's coarse parameter groups, the depth a user asks for, and (un)freezing.

Freeze depth counts timm's coarse parameter groups (``model.group_matcher(coarse=True)``,
grouped by ``timm.models.group_parameters``), stem first, with the classifier excluded: ``0``
trains everything, ``k`` freezes the first ``k`` groups (their BatchNorm statistics too, via
``timm.utils.freeze``), ``"all"`` trains only the head. The caller freezes before it wraps the
model in DDP.

Which whole modules a group owns is worked out here, not with ``timm.models.group_modules``:
timm's lists only modules that hold parameters themselves, so it misses a frozen BatchNorm
(its weights are buffers then) when a phase unfreezes it, and a parameter held by the root
module (a ViT's cls_token).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from timm.models import group_parameters
from timm.utils import freeze as timm_freeze
from timm.utils import unfreeze as timm_unfreeze
from torch import nn

from tlray.errors import TlrayError
from tlray.model.weights import classifier_names

Freeze = int | str


@dataclass(frozen=True)
class GroupInfo:
    """One coarse parameter group: freeze depth ``index + 1`` is the first that freezes it."""

    index: int
    name: str
    n_params: int


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


def group_sizes(model: nn.Module) -> list[GroupInfo]:
    """`model_groups` with each group's parameter count (works on the meta device)."""
    params = dict(model.named_parameters())
    return [
        GroupInfo(i, name, sum(params[n].numel() for n in names))
        for i, (name, names) in enumerate(model_groups(model))
    ]


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
