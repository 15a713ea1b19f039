"""Backbone names: an unknown one (or an unknown pretrained tag) is refused before anything is
built, with the timm names it was most likely meant to be."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import timm

from tlray.errors import TlrayError
from tlray.model.scratch import SCRATCH_CNN


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
