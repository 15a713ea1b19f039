"""Backbones, heads and freeze depth, with real timm models (tiny `test_*` ones mostly)."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from timm.data import ImageNetInfo, create_transform
from timm.layers import FrozenBatchNormAct2d
from torch import nn

from tlray.errors import TlrayError
from tlray.cli.data_commands import format_groups
from tlray.model.build import build_model, describe_backbone
from tlray.model.freeze import model_groups
from tlray.model.heads import MLPHead
from tlray.model.weights import classifier_names

# ImageNet classes a photo of a Chinese palace/temple may fairly land in.
BUILDING_CLASSES = {698, 663, 497, 538, 442, 832, 668, 483, 449}  # palace, monastery, church, ...
DAISY = 985


@pytest.fixture(autouse=True)
def _tlray_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Converted weights go to a per-session temporary home, never the user's."""
    monkeypatch.setenv("TLRAY_HOME", str(tmp_path_factory.getbasetemp() / "tlray-home"))


def test_packaged_weights_are_real_imagenet_weights() -> None:
    model, info = build_model("tf_efficientnet_lite0", 1000, weights="packaged")
    config = info.data_config
    assert config["input_size"] == (3, 224, 224)
    assert config["interpolation"] == "bicubic"
    assert config["mean"] == config["std"] == (0.5, 0.5, 0.5)

    transform = create_transform(**config)
    photos = load_sample_images()
    batch = torch.stack([transform(Image.fromarray(image)) for image in photos.images])
    with torch.no_grad():
        top5 = model.eval()(batch).topk(5).indices.tolist()
    names = [name.rsplit("/", 1)[-1] for name in photos.filenames]
    predictions = dict(zip(names, top5))
    labels = ImageNetInfo()
    described = {n: [labels.index_to_description(i) for i in p] for n, p in predictions.items()}
    assert predictions["flower.jpg"][0] == DAISY, described
    assert BUILDING_CLASSES & set(predictions["china.jpg"]), described


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_steps(model: nn.Module, in_chans: int = 3, size: int = 32, classes: int = 4) -> None:
    torch.manual_seed(1)
    x = torch.randn(4, in_chans, size, size)
    y = torch.arange(4) % classes
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    # Two steps: timm zero-initialises the last BatchNorm of each ResNet block, which blocks
    # the gradient to the rest of the block until one step has moved it.
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _group_of_keys(backbone: str, model: nn.Module, **kwargs: object) -> dict[str, int]:
    """Map every state-dict key to its group index (-1 for the head), via an unfrozen twin.

    Buffers (BatchNorm running statistics) belong to the group of their module's weight.
    """
    twin, _ = build_model(backbone, 4, weights="none", freeze=0, **kwargs)
    param_group = {n: i for i, (_, names) in enumerate(model_groups(twin)) for n in names}
    head = tuple(f"{c}." for c in classifier_names(model))
    groups = {}
    for key in model.state_dict():
        if key.startswith(head):
            groups[key] = -1
        elif key in param_group:
            groups[key] = param_group[key]
        else:
            groups[key] = param_group[key.rsplit(".", 1)[0] + ".weight"]
    return groups


FAMILIES = [
    ("test_efficientnet", {}),
    ("test_resnet", {}),
    ("test_vit", {"img_size": 32}),
    ("test_convnext", {}),
]


@pytest.mark.parametrize("backbone,kwargs", FAMILIES, ids=[f[0] for f in FAMILIES])
@pytest.mark.parametrize("freeze", [0, 2, "all"])
def test_freeze_depth_keeps_exactly_the_frozen_groups(
    backbone: str, kwargs: dict[str, object], freeze: int | str
) -> None:
    torch.manual_seed(0)
    model, info = build_model(backbone, 4, weights="none", freeze=freeze, **kwargs)
    n_groups = len(info.group_names)
    depth = n_groups if freeze == "all" else freeze
    assert info.freeze_depth == depth
    groups = _group_of_keys(backbone, model, **kwargs)
    before = _snapshot(model)

    _train_steps(model)

    after = model.state_dict()
    frozen = sorted(k for k, g in groups.items() if 0 <= g < depth)
    trained = sorted(k for k, g in groups.items() if not 0 <= g < depth)
    assert all(torch.equal(before[k], after[k]) for k in frozen), [
        k for k in frozen if not torch.equal(before[k], after[k])
    ]
    assert [k for k in trained if torch.equal(before[k], after[k])] == []
    if depth:
        has_batchnorm = backbone in ("test_efficientnet", "test_resnet")
        assert any(k.endswith("running_mean") for k in frozen) == has_batchnorm
    assert info.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info.trainable_params < info.total_params or depth == 0


def test_freeze_converts_frozen_batchnorm_only() -> None:
    model, _ = build_model("test_efficientnet", 4, weights="none", freeze=1)
    assert isinstance(model.bn1, FrozenBatchNormAct2d)
    assert not isinstance(model.blocks[0][0].bn1, FrozenBatchNormAct2d)


def test_freeze_accepts_numeric_strings() -> None:
    _, info = build_model("test_resnet", 3, weights="none", freeze=" 3 ")
    assert info.freeze_depth == 3


def test_mlp_head_reproduces_the_malaria_original() -> None:
    model, info = build_model("test_resnet", 2, weights="none", head="mlp", freeze="all")
    assert isinstance(model.fc, MLPHead)
    layers = [m for m in model.fc if isinstance(m, (nn.Linear, nn.Dropout))]
    assert [(m.in_features, m.out_features) for m in layers if isinstance(m, nn.Linear)] == [
        (model.num_features, 256), (256, 128), (128, 2)
    ]
    assert [m.p for m in layers if isinstance(m, nn.Dropout)] == [0.4]
    assert info.trainable_params == sum(p.numel() for p in model.fc.parameters())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)


@pytest.mark.parametrize(
    "in_chans,size,classes", [(1, 28, 10), (3, 128, 2)], ids=["grey28", "rgb128"]
)
def test_scratch_cnn_forward_shapes(in_chans: int, size: int, classes: int) -> None:
    model, info = build_model(
        "scratch_cnn", classes, in_chans=in_chans, img_size=size, weights="none"
    )
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (64, (3, 3), (1, 1)), (128, (3, 3), (1, 1)), (256, (3, 3), (1, 1))
    ]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.1, 0.3]
    assert model(torch.randn(2, in_chans, size, size)).shape == (2, classes)
    assert info.data_config["input_size"] == (in_chans, size, size)
    assert info.freeze_depth == 0 and info.trainable_params == info.total_params


def test_scratch_cnn_freezes_like_a_timm_model() -> None:
    model, info = build_model("scratch_cnn", 2, in_chans=1, img_size=28, weights="none", freeze=2)
    assert info.group_names == ("features.0", "features.1", "features.2", "dense")
    assert not any(p.requires_grad for p in model.features[:2].parameters())
    assert all(p.requires_grad for p in model.features[2].parameters())


def test_grey_input_gets_single_channel_data_config() -> None:
    _, info = build_model("test_efficientnet", 3, in_chans=1, weights="none")  # ImageNet mean/std
    assert info.data_config["input_size"][0] == 1
    assert info.data_config["mean"] == pytest.approx(((0.485 + 0.456 + 0.406) / 3,))
    assert info.data_config["std"] == pytest.approx(((0.229 + 0.224 + 0.225) / 3,))


def test_describe_backbone_lists_groups_and_valid_freeze_values() -> None:
    groups = describe_backbone("test_resnet")
    assert [g.name for g in groups] == ["conv1+bn1", "layer1", "layer2", "layer3", "layer4"]
    assert [g.index for g in groups] == list(range(5))
    model, info = build_model("test_resnet", 1000, weights="none")
    head = sum(p.numel() for p in model.fc.parameters())
    assert sum(g.n_params for g in groups) + head == info.total_params
    table = format_groups("test_resnet", groups)
    assert "layer4" in table and "0 (train everything) .. 5" in table and "'all'" in table
    effnet = [g.name for g in describe_backbone("tf_efficientnet_lite0")]
    assert effnet[0] == "conv_stem+bn1" and effnet[-1] == "blocks.6+conv_head+bn2"
    assert [g.name for g in describe_backbone("scratch_cnn")][-1] == "dense"


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"backbone": "efficentnet_b0"}, ["unknown model 'efficentnet_b0'", "efficientnet_b0"]),
        ({"backbone": "resnet18.no_such_tag"}, ["unknown pretrained tag", "resnet18.a1_in1k"]),
        ({"freeze": 9}, ["freeze 9 is out of range for test_resnet", "0..5", "layer1"]),
        ({"freeze": "most"}, ["'all'", "'most'"]),
        ({"freeze": -1}, ["out of range", "0..5"]),
        ({"num_classes": 1}, ["num_classes", ">= 2"]),
        ({"head": "conv"}, ["head", "'mlp'"]),
        ({"backbone": "scratch_cnn", "img_size": 32}, ["scratch_cnn", "--weights none"]),
        ({"backbone": "scratch_cnn", "weights": "none"}, ["img_size"]),
        ({"backbone": "scratch_cnn", "weights": "none", "img_size": 4}, ["too small"]),
        ({"weights": "imagenet"}, ["unknown source 'imagenet'", "file:PATH"]),
    ],
)
def test_bad_input_raises_a_helpful_error(kwargs: dict[str, object], expected: list[str]) -> None:
    args: dict[str, object] = {"backbone": "test_resnet", "num_classes": 3, "weights": "packaged"}
    args.update(kwargs)
    if args["backbone"] == "test_resnet" and "weights" not in kwargs:
        args["weights"] = "none"
    with pytest.raises(TlrayError) as excinfo:
        build_model(**args)  # type: ignore[arg-type]
    for text in expected:
        assert text in str(excinfo.value)


@pytest.mark.parametrize("typo, first", [("efficientnet_bO", "efficientnet_b0"),
                                         ("EfficientNet_B0", "efficientnet_b0"),
                                         ("resnetl8", "resnet18"), ("resnet5O", "resnet50")])
def test_look_alike_typos_suggest_the_intended_backbone_first(typo: str, first: str) -> None:
    from tlray.cli.main import main

    with pytest.raises(TlrayError, match=f"did you mean {first},"):
        build_model(typo, 10, weights="none")
    assert main(["models", "describe", typo]) == 2


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_a_zero_head_starts_every_class_equally_likely_and_then_learns(head) -> None:
    torch.manual_seed(0)
    model, _ = build_model("test_efficientnet", 10, in_chans=1, img_size=32, weights="none",
                           head=head, head_init="zero", freeze="all")
    x, y = torch.randn(8, 1, 32, 32), torch.arange(8)
    loss = nn.functional.cross_entropy(model(x), y)
    assert loss.item() == pytest.approx(math.log(10))  # logits all 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):  # the zero layer moves first, then the layers before it
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert nn.functional.cross_entropy(model(x), y).item() < loss.item()
    timm_init, _ = build_model("test_efficientnet", 10, in_chans=1, img_size=32,
                               weights="none", head=head)
    assert timm_init(x).abs().max() > 0
