"""The new head on a backbone: the malaria original's MLP head, and a zero-initialised output.

Every task is single-label classification with ``num_classes >= 2`` outputs trained with softmax
cross-entropy, binary tasks included: where the malaria original used one sigmoid unit, tlray
uses two logits.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from torch import Tensor, nn

from tlray.errors import TlrayError
from tlray.model.weights import classifier_names


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


def attach_mlp_head(
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


def zero_output_layer(model: nn.Module) -> None:
    """The new head's last linear layer at zero (Big Transfer's head init): every class
    starts equally likely, so the first steps' gradients are the features' and not a random
    layer's large logits (timm's init for efficientnet's classifier starts the digits near
    a loss of 8, with a frozen backbone near 20)."""
    layers = [m for m in model.get_classifier().modules() if isinstance(m, nn.Linear)]
    if layers:
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
