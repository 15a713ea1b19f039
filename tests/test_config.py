"""Config resolution: defaults, a YAML file, then --section.key=value overrides."""

from __future__ import annotations

import pytest

from tlray import config
from tlray.cli.main import main
from tlray.errors import TlrayError


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  backbone: resnet18\n  freeze: all\noptim:\n  lr: 0.01\n"
                    "tune:\n  space: {optim.weight_decay: [0, 0.05]}\n")
    cfg = config.load(path, ["--optim.lr=3e-4", "--train.patience=2",
                             "--scaling.use_gpu=false", "storage_path=s3://b/x"])
    assert cfg.model.backbone == "resnet18" and cfg.model.freeze == "all"
    assert cfg.optim.lr == 3e-4 and cfg.train.patience == 2 and cfg.scaling.use_gpu is False
    assert cfg.tune.space == {"optim.weight_decay": [0, 0.05]}
    assert cfg.storage_path == "s3://b/x"
    # The saved YAML reproduces the same config.
    again = tmp_path / "again.yaml"
    again.write_text(config.dump_yaml(cfg))
    assert config.load(again) == cfg


@pytest.mark.parametrize("override, message", [
    ("--optim.lrr=1", "unknown setting; did you mean optim.lr"),
    ("--optim.lr=fast", "--optim.lr: expected float, got 'fast'"),
    ("--train.epochs=2.5", "--train.epochs: expected int"),
    ("--train.epochs=0", "--train.epochs: expected an int >= 1"),
    ("--model.freeze=most", "--model.freeze: 'most' is not a phase"),
    ("--train.checkpoint_every=often", "--train.checkpoint_every: expected steps"),
    ("--train.checkpoint_every=2.5", "a count of steps is a whole number"),
    ("--scaling.num_workers=3-1", "--scaling.num_workers: expected 1 <= MIN <= MAX"),
    ("--scaling.num_workers=some", "--scaling.num_workers: expected a count"),
    ("--scaling.max_preemptions=-2", "--scaling.max_preemptions: expected an int >= 0"),
    ("--optim.name=adagradx", "--optim.name: expected one of adam, adamw, nadam, sgd"),
    ("--train.monitor=val_f1", "--train.monitor: expected one of val_loss"),
    ("--tune.num_samples=0", "--tune.num_samples: expected an int >= 1"),
    ("--scaling.placement_strategy=ANY", "--scaling.placement_strategy"),
    ("--nosection.key=1", "unknown setting"),
    ("--optim", "expected --section.key=value"),
])
def test_bad_values_are_explained(override, message):
    with pytest.raises(TlrayError, match=message.replace("(", r"\(")):
        config.load(None, [override])


def test_bad_files_are_explained(tmp_path):
    with pytest.raises(TlrayError, match="no such file"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(TlrayError, match="not valid YAML"):
        config.load(bad)


def test_round_trip_through_plain_dicts():
    cfg = config.load(None, ["--data.image_size=64", "--tune.freeze=0,all"])
    assert config.from_plain(cfg.to_dict()) == cfg


def test_cli_prints_resolved_config_and_rejects_typos(capsys):
    assert main(["train", "--optim.lr=0.02", "--print-config"]) == 0
    assert "lr: 0.02" in capsys.readouterr().out
    assert main(["train", "--optim.lr", "0.03", "--print-config"]) == 0  # or with a space
    assert "lr: 0.03" in capsys.readouterr().out


def test_none_turns_off_an_optional_setting_a_preset_turned_on():
    cfg = config.load(None, ["--train.ema=0.998", "--train.ema=none", "--optim.layer_decay=null"])
    assert cfg.train.ema is None and cfg.optim.layer_decay is None
    with pytest.raises(TlrayError, match="train.epochs"):
        config.load(None, ["--train.epochs=none"])  # not optional: still an error
