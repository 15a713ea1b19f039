"""The command line: every setting in --help, one set of flags for every run command and job
script, hints that name real options, and an import of tlray that changes nothing."""

from __future__ import annotations

import argparse
import ast
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tlray.cli import jobs
from tlray.cli.main import build_parser, main
from tlray.cli.settings import SHORT_FLAGS
from tlray.config.settings import all_settings

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"


@functools.lru_cache(maxsize=None)
def subcommand(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def job_help(script: str, capsys) -> str:
    """A job script's --help, run as the script runs (its own `main`)."""
    namespace: dict = {"__name__": "job", "__file__": str(JOBS / script)}
    exec(compile((JOBS / script).read_text(), str(JOBS / script), "exec"), namespace)
    with pytest.raises(SystemExit):
        namespace["main"](["--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("source", ["train", "tune", "compare", "tune_mnist.py",
                                    "tune_malaria.py", "compare_scratch.py"])
def test_help_lists_every_setting_with_its_default(source, capsys):
    if source.endswith(".py"):
        text = job_help(source, capsys)
    else:
        with pytest.raises(SystemExit):
            main([source, "--help"])
        text = capsys.readouterr().out
    flat = " ".join(text.split())
    for key, f, default in all_settings():
        start = flat.find(f"--{key} ")
        assert start >= 0, f"--{key} is not in {source} --help"
        shown = "empty" if default is None else str(default).lower() if isinstance(
            default, bool) else str(default)
        end = flat.find(" --", start + 3)
        entry = flat[start:end if end > 0 else len(flat)]
        assert f"(default: {shown})" in entry, (key, entry)
        assert f.metadata["help"].split()[0] in entry  # its one-line description
    for flag in [*SHORT_FLAGS, "--gpu", "--config", "--print-config", "--set"]:
        assert f"{flag} " in flat


@pytest.mark.parametrize("script, extra", [("tune_mnist.py", []), ("tune_malaria.py", []),
                                           ("compare_scratch.py", ["--smoke"])])
def test_every_job_takes_the_shared_flags(script, extra, capsys, tmp_path):
    namespace: dict = {"__name__": "job", "__file__": str(JOBS / script)}
    exec(compile((JOBS / script).read_text(), str(JOBS / script), "exec"), namespace)
    flags = ["--data", str(tmp_path), "--backbone", "tf_efficientnet_lite0", "--weights",
             "packaged", "--image-size", "64", "--epochs", "3", "--lr", "0.002", "--freeze",
             "all", "--gpu", "--data.batch_size", "16", "--set", "train.seed=7"]
    assert namespace["main"]([*flags, *extra, "--print-config"]) == 0
    out = capsys.readouterr().out
    for line in ("backbone: tf_efficientnet_lite0", "weights: packaged", "image_size: 64",
                 "epochs: 3", "lr: 0.002", "freeze: all", "use_gpu: true", "batch_size: 16",
                 "seed: 7", f"dataset: {tmp_path}"):
        assert line in out, line


def test_a_config_file_sits_between_a_jobs_defaults_and_the_options(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  image_size: 40\ntrain:\n  epochs: 2\n")
    assert jobs.run_job("tune", ["--config", str(path), "--epochs", "4", "--print-config"],
                        doc="job\n", defaults=["data.image_size=48", "train.epochs=5",
                                               "tune.num_samples=3"]) == 0
    out = capsys.readouterr().out
    assert "image_size: 40" in out and "epochs: 4" in out and "num_samples: 3" in out


def test_a_typo_is_refused_not_guessed(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--smok"])  # neither an abbreviation nor a setting
    assert exit_.value.code == 2
    assert "unrecognized arguments: --smok" in capsys.readouterr().err
    assert main(["train", "--optim.lr=-1"]) == 2
    assert "tlray: error: --optim.lr" in capsys.readouterr().err


# --------------------------------------------------------------------------- hints

_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_.-]*[a-z0-9_]")
# Flags of other programs that tlray's messages name along with that program's command.
_OTHER_PROGRAMS = {"--env-manager": "mlflow models serve", "--backend-store-uri": "mlflow",
                   "--host": "mlflow", "--port": "mlflow", "--experiment-id": "mlflow"}


def _messages(path: Path) -> list[str]:
    """The string constants and f-strings of a module (docstrings left out); implicitly
    concatenated f-string pieces as one message."""
    tree = ast.parse(path.read_text())
    skip = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
            and node.body and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)}
    messages = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip |= {id(v) for v in node.values}
            messages.append("".join(v.value if isinstance(v, ast.Constant) else "{}"
                                    for v in node.values))
    messages += [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                 and isinstance(node.value, str) and id(node) not in skip]
    return messages


def _commands_of(module: Path) -> list[tuple[str, ...]]:
    """The commands whose runs can print this module's messages."""
    rel = module.relative_to(ROOT / "tlray").as_posix()
    if rel in ("data/prepare.py", "data/sources.py", "data/pixel_sources.py", "data/folders.py",
               "data/source_images.py", "data/dataset.py"):
        return [("prepare",)]
    if rel.startswith("serve/predict"):
        return [("predict",)]
    if rel in ("bench/prepare.py", "bench/predict.py"):  # they run the command they time
        command = rel.removeprefix("bench/").removesuffix(".py")
        return [("benchmark", command), (command,)]
    if rel.startswith(("bench/", "cli/bench")):
        return [("benchmark", "train"), ("benchmark", "sweep"), ("benchmark", "ingest"),
                ("benchmark", "prepare"), ("benchmark", "predict")]
    if rel.startswith("cli/data_commands"):
        return [("prepare",), ("inspect",), ("augment-preview",)]
    if rel.startswith("cli/predict"):
        return [("predict",)]
    return [("train",), ("tune",), ("compare",)]


def test_every_hint_names_an_option_its_command_accepts():
    unknown = []
    for module in sorted((ROOT / "tlray").rglob("*.py")):
        for message in _messages(module):
            # A message that names a tlray command hints at that command's options.
            named = re.findall(r"\btlray (prepare|train|tune|compare|predict|inspect)\b", message)
            commands = [(c,) for c in named] or _commands_of(module)
            accepted = {o for c in commands for o in subcommand(*c)._option_string_actions}
            for flag in _FLAG.findall(message):
                program = _OTHER_PROGRAMS.get(flag)
                if program and program in message:
                    continue
                # "--data.augment_*": a family of options
                ok = flag in accepted or (flag.endswith("_") and any(
                    o.startswith(flag) for o in accepted)) or flag == "--section.key"
                if not ok:
                    unknown.append(f"{module.relative_to(ROOT)}: {flag}")
    assert unknown == []


def test_hints_of_the_offline_weights_name_the_flags_of_every_run_command():
    from tlray.model.weight_hub import _OFFLINE_HINT

    for command in ("train", "tune", "compare"):
        parser = subcommand(command)
        for flag in _FLAG.findall(_OFFLINE_HINT):
            assert flag in parser._option_string_actions, (command, flag)


# --------------------------------------------------------------------------- imports


def test_importing_tlray_changes_nothing_and_the_config_needs_no_torch():
    code = """
import os, sys
before = dict(os.environ)
import tlray, tlray.config
from tlray.cli.main import main
assert main(["train", "--print-config", "--epochs", "3"]) == 0
heavy = [m for m in ("torch", "ray", "mlflow", "timm", "sklearn") if m in sys.modules]
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print("HEAVY", heavy, "CHANGED", changed)
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_DEDUP_LOGS_ALLOW_REGEX"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert "epochs: 3" in out
    assert out.strip().splitlines()[-1] == "HEAVY [] CHANGED []"


def test_a_command_exits_with_its_status_after_its_threads_exit_handlers_and_last_output(
        tmp_path):
    # What a normal exit does that anyone could see still happens: exit_now skips only
    # Python's teardown of its modules.
    code = f"""
import atexit, sys, threading, time
from pathlib import Path
from tlray.cli.exit import exit_now
atexit.register(lambda: Path({str(tmp_path / "atexit")!r}).write_text("ran"))
def late(): time.sleep(0.3); Path({str(tmp_path / "thread")!r}).write_text("done")
threading.Thread(target=late).start()
sys.stdout.write("no newline, still buffered")
exit_now(3)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 3, out.stderr
    assert out.stdout == "no newline, still buffered"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"
