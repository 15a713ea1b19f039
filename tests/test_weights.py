"""Weight sources, end to end with real torch, timm, safetensors and MLflow (no network)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from tlray.errors import TlrayError
from tlray.model.build import build_model
from tlray.model.heads import MLPHead
from tlray.model.weights import packaged_weights_path, parse_weights
from tlray.paths import cache_dir

BACKBONE = "test_efficientnet"


@pytest.fixture(autouse=True)
def _tlray_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLRAY_HOME", str(tmp_path_factory.getbasetemp() / "tlray-home"))


def _trained(in_chans: int = 3, classes: int = 3, **kwargs: object) -> nn.Module:
    """A small model whose weights and BatchNorm statistics are not at their init values."""
    torch.manual_seed(0)
    model, _ = build_model(BACKBONE, classes, in_chans=in_chans, weights="none", **kwargs)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(4, in_chans, 32, 32), torch.arange(4) % classes
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return model.eval()


def _assert_same_model(original: nn.Module, loaded: nn.Module, in_chans: int = 3) -> None:
    expected = original.state_dict()
    got = loaded.state_dict()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    x = torch.randn(2, in_chans, 32, 32)
    with torch.no_grad():
        assert torch.equal(original.eval()(x), loaded.eval()(x))


# --- spec parsing -------------------------------------------------------------------------


def test_parse_weights_forms() -> None:
    assert parse_weights("hub").kind == "timm"
    assert parse_weights("RANDOM").kind == "none"
    assert parse_weights("packaged").kind == "packaged"
    assert parse_weights("file:~/w.pth").location == str(Path("~/w.pth").expanduser())
    for uri in ("models:/digits@champion", "models:/digits/3", "runs:/abc123/model"):
        spec = parse_weights(uri)
        assert (spec.kind, spec.location, spec.spec) == ("mlflow", uri, uri)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("imagenet", ["unknown source", "'packaged'", "file:PATH", "models:/NAME@ALIAS"]),
        ("weights.pth", ["file:weights.pth"]),
        ("file:", ["needs a path"]),
        ("models:/", ["not an MLflow model URI", "models:/NAME/VERSION"]),
    ],
)
def test_parse_weights_rejects_bad_specs(spec: str, expected: list[str]) -> None:
    with pytest.raises(TlrayError) as excinfo:
        parse_weights(spec)
    for text in expected:
        assert text in str(excinfo.value)


# --- packaged -----------------------------------------------------------------------------


def test_packaged_weights_are_cached_once_and_adapted_to_grey() -> None:
    path = packaged_weights_path()
    assert path.parent == cache_dir() / "weights" and path.suffix == ".safetensors"
    stamp = path.stat().st_mtime_ns
    assert packaged_weights_path() == path and path.stat().st_mtime_ns == stamp
    packaged = safetensors.torch.load_file(str(path))

    model, info = build_model("tf_efficientnet_lite0", 10, in_chans=1, weights="packaged")

    assert torch.equal(model.conv_stem.weight, packaged["conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(model.blocks[6][0].conv_pw.weight, packaged["blocks.6.0.conv_pw.weight"])
    assert model.classifier.weight.shape == (10, 1280)
    assert info.data_config["mean"] == info.data_config["std"] == (0.5,)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_packaged_weights_only_fit_lite0() -> None:
    with pytest.raises(TlrayError, match="tf_efficientnet_lite0") as excinfo:
        build_model("resnet18", 10, weights="packaged")
    assert "resnet18" in str(excinfo.value)


# --- file: --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_source_round_trips_exactly(tmp_path: Path, suffix: str) -> None:
    original = _trained()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(original.state_dict(), path)
    else:
        safetensors.torch.save_file(original.state_dict(), str(path))

    loaded, info = build_model(BACKBONE, 3, weights=f"file:{path}")

    _assert_same_model(original, loaded)
    assert info.weights == f"file:{path}"


def test_file_source_accepts_checkpoints_and_ddp_prefixes(tmp_path: Path) -> None:
    original = _trained()
    path = tmp_path / "checkpoint.pt"
    wrapped = {f"module.{k}": v for k, v in original.state_dict().items()}
    torch.save({"epoch": 4, "state_dict": wrapped}, path)
    loaded, _ = build_model(BACKBONE, 3, weights=f"file:{path}")
    _assert_same_model(original, loaded)


def test_file_source_new_classes_and_grey_stem(tmp_path: Path) -> None:
    original = _trained()
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(original.state_dict(), str(path))

    loaded, info = build_model(BACKBONE, 7, in_chans=1, weights=f"file:{path}", head="mlp")

    expected = original.state_dict()
    got = loaded.state_dict()
    assert torch.equal(got["conv_stem.weight"], expected["conv_stem.weight"].sum(1, keepdim=True))
    body = [k for k in expected if not k.startswith(("conv_stem.", "classifier."))]
    assert all(torch.equal(got[k], expected[k]) for k in body)
    assert isinstance(loaded.classifier, MLPHead) and loaded.classifier.fc3.out_features == 7
    assert loaded(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert info.data_config["input_size"][0] == 1


def test_file_source_onto_a_smaller_grey_vit(tmp_path: Path) -> None:
    """timm's own checkpoint filter still runs: the position embedding is resampled."""
    torch.manual_seed(0)
    source = timm.create_model("test_vit")  # 160 px, 10x10 patches
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)

    model, info = build_model("test_vit", 3, in_chans=1, img_size=32, weights=f"file:{path}")

    assert model.pos_embed.shape == (1, 1 + 2 * 2, source.embed_dim)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert torch.equal(
        model.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(1, keepdim=True)
    )
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    assert info.data_config["input_size"] == (1, 32, 32)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TlrayError, match="does not exist") as excinfo:
        build_model(BACKBONE, 3, weights=f"file:{tmp_path / 'nope.pth'}")
    assert "nope.pth" in str(excinfo.value)


@pytest.mark.parametrize(
    "content,expected",
    [
        ({"epoch": 3, "lr": 0.1}, "not a state dict"),
        ([torch.zeros(3)], "not a state dict"),
        (b"hello, I am text", "could not be read as a PyTorch state dict"),
    ],
    ids=["dict-of-numbers", "list", "text"],
)
def test_file_that_is_not_a_state_dict(tmp_path: Path, content: object, expected: str) -> None:
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(TlrayError, match=expected) as excinfo:
        build_model(BACKBONE, 3, weights=f"file:{path}")
    assert "weights.pth" in str(excinfo.value)


def test_weights_with_a_wrong_shape_name_the_tensor(tmp_path: Path) -> None:
    state = _trained().state_dict()
    state["blocks.1.0.conv_exp.weight"] = torch.zeros(5, 2, 1, 1)
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(TlrayError) as excinfo:
        build_model(BACKBONE, 3, weights=f"file:{path}")
    message = str(excinfo.value)
    assert "'blocks.1.0.conv_exp.weight'" in message and "(5, 2, 1, 1)" in message
    assert str(tuple(_trained().blocks[1][0].conv_exp.weight.shape)) in message


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), path)
    with pytest.raises(TlrayError) as excinfo:
        build_model(BACKBONE, 5, weights=f"file:{path}")  # class counts differ: timm is lenient
    message = str(excinfo.value)
    assert "do not fit test_efficientnet" in message
    assert "missing (first: 'conv_stem.weight')" in message and "'conv1.0.weight'" in message


# --- timm's hub ---------------------------------------------------------------------------


def test_hub_offline_fails_without_touching_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with socket.socket() as hub:  # a hub that would answer: it must not even be asked
        hub.bind(("127.0.0.1", 0))
        hub.listen()
        hub.setblocking(False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
        with pytest.raises(TlrayError) as excinfo:
            build_model(BACKBONE, 3, weights="timm")
        with pytest.raises(BlockingIOError):
            hub.accept()  # no connection is waiting
    message = str(excinfo.value)
    for text in ("HF_HUB_OFFLINE", "--weights packaged", "file:PATH", "models:/NAME@ALIAS"):
        assert text in message


def test_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(TlrayError, match="cannot reach the Hugging Face hub") as excinfo:
        build_model(BACKBONE, 3, weights="hub")
    assert "--weights packaged" in str(excinfo.value)


def test_hub_weights_in_the_local_cache_load_without_network(tmp_path: Path) -> None:
    """A pre-populated HF cache is used even when the hub is unreachable (fresh process,
    because huggingface_hub reads HF_HUB_CACHE at import)."""
    cfg = timm.models.get_pretrained_cfg(BACKBONE)
    repo = tmp_path / "hub" / ("models--" + cfg.hf_hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef")
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    torch.manual_seed(0)
    safetensors.torch.save_file(
        timm.create_model(BACKBONE).state_dict(), str(snapshot / "model.safetensors")
    )
    script = textwrap.dedent(
        f"""
        import safetensors.torch, torch
        from tlray.model.build import build_model
        hub = safetensors.torch.load_file({str(snapshot / "model.safetensors")!r})
        model, info = build_model({BACKBONE!r}, 4, in_chans=1, weights="timm")
        assert torch.equal(model.conv_stem.weight, hub["conv_stem.weight"].sum(1, keepdim=True))
        assert torch.equal(model.blocks[4][0].conv_pw.weight, hub["blocks.4.0.conv_pw.weight"])
        assert model.classifier.weight.shape == (4, model.num_features)
        print("loaded from cache")
        """
    )
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_ENDPOINT": "https://127.0.0.1:9",
        "TLRAY_HOME": str(tmp_path / "home"),
    }
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded from cache" in result.stdout


# --- MLflow -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[nn.Module, str, str]]:
    """A grey, MLP-headed, partly frozen model as tlray logs it (its network in pt2, beside
    the raw-image pyfunc), registered, aliased."""
    import mlflow
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        experiment = mlflow.create_experiment(
            "tlray-weights", artifact_location=str(root / "artifacts")
        )
        model = _trained(in_chans=1, classes=3, head="mlp", freeze=2)
        from tlray.serve.log_model import log_model

        with mlflow.start_run(experiment_id=experiment) as run:
            digits = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
            logged = log_model(model, digits, ["a", "b", "c"],
                               {"mean": [0.5], "std": [0.5], "size": [32, 32], "channels": 1})
        version = mlflow.register_model(logged.model_uri, "tlray-test-model")
        MlflowClient().set_registered_model_alias("tlray-test-model", "champion", version.version)
        yield model, run.info.run_id, version.version


def test_mlflow_alias_round_trips_exactly(logged_model: tuple[nn.Module, str, str]) -> None:
    original, _, _ = logged_model
    loaded, info = build_model(
        BACKBONE, 3, in_chans=1, head="mlp", freeze=2, weights="models:/tlray-test-model@champion"
    )
    _assert_same_model(original, loaded, in_chans=1)
    assert info.weights == "models:/tlray-test-model@champion"


def test_mlflow_version_and_run_uris(logged_model: tuple[nn.Module, str, str]) -> None:
    original, run_id, version = logged_model
    for uri in (f"models:/tlray-test-model/{version}", f"runs:/{run_id}/model"):
        # Unfrozen this time: the logged FrozenBatchNorm statistics become plain BatchNorm.
        loaded, _ = build_model(BACKBONE, 3, in_chans=1, head="mlp", weights=uri)
        expected = original.state_dict()
        got = loaded.state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), uri
        assert isinstance(loaded.classifier, MLPHead)


def test_mlflow_model_to_new_task(logged_model: tuple[nn.Module, str, str]) -> None:
    """Another class count and RGB input: the stem is adapted, the (MLP) head starts fresh."""
    original, _, _ = logged_model
    loaded, _ = build_model(BACKBONE, 5, in_chans=3, weights="models:/tlray-test-model@champion")
    expected = original.state_dict()
    got = loaded.state_dict()
    # timm's adapt_input_conv repeats the grey filter and scales by 1/3.
    rgb_stem = expected["conv_stem.weight"].repeat(1, 3, 1, 1) * (1 / 3)
    assert torch.equal(got["conv_stem.weight"], rgb_stem)
    body = [k for k in expected if not k.startswith(("conv_stem.", "classifier."))]
    assert all(torch.equal(got[k], expected[k]) for k in body)
    assert isinstance(loaded.classifier, nn.Linear) and loaded.classifier.out_features == 5


@pytest.mark.parametrize(
    "uri", ["models:/no-such-model@champion", "models:/tlray-test-model/99", "runs:/0123abc/model"]
)
def test_unknown_mlflow_model(logged_model: tuple[nn.Module, str, str], uri: str) -> None:
    with pytest.raises(TlrayError, match="MLflow cannot find this model") as excinfo:
        build_model(BACKBONE, 3, in_chans=1, weights=uri)
    assert uri in str(excinfo.value) and "sqlite:///" in str(excinfo.value)
