"""The malaria original's from-scratch CNN, shaped like a timm model so that everything else
(freeze groups, data config, weights, the feature cache) treats it as one."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from tlray.errors import TlrayError

SCRATCH_CNN = "scratch_cnn"


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
