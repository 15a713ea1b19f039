"""Where a sweep lives in Ray storage, and which one `--resume` (or `--more`) continues.

A sweep is one or more Tune experiments, its parts: the first, then one more for each time
it was grown (`--more N`), side by side under `<storage>/`. A small state file in the first
part's directory records the parts, which of them ran to their end, the MLflow parent run
and whether the sweep was finished (its winner picked and registered).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tlray.config import Config
from tlray.data.dataset import filesystem
from tlray.errors import TlrayError

STATE_FILE = "tlray_sweep.json"


@dataclass
class SweepState:
    name: str
    parent_run_id: str | None = None
    parts: list[str] = field(default_factory=list)  # Tune experiments, in order
    done: list[str] = field(default_factory=list)  # parts that ran to their end
    finished: bool = False  # the winner was picked and registered

    def write(self, storage: str) -> None:
        fs, path = filesystem(f"{storage.rstrip('/')}/{self.name}")
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/{STATE_FILE}") as f:
            f.write(json.dumps(dataclasses.asdict(self)).encode())


def read_state(storage: str, name: str) -> SweepState | None:
    fs, path = filesystem(f"{storage.rstrip('/')}/{name}")
    try:
        with fs.open_input_stream(f"{path}/{STATE_FILE}") as f:
            values = json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None
    values.setdefault("parts", [name])  # a sweep of an older tlray
    return SweepState(**{k: v for k, v in values.items()
                         if k in {f.name for f in dataclasses.fields(SweepState)}})


def locate(cfg: Config, info, storage: str, *, resume: bool, grow: bool) -> SweepState:
    """A new sweep's state, or the one to continue: the one named by `tune.name`, else the
    latest of this dataset and backbone (unfinished, unless it is to be grown)."""
    if not (resume or grow):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = cfg.tune.name or f"sweep-{info.name}-{cfg.model.backbone}-{stamp}"
        return SweepState(name=name, parts=[name])
    flag = "--more" if grow else "--resume"
    if cfg.tune.name:
        candidates = [cfg.tune.name]
    elif "://" in storage:
        raise TlrayError(f"{flag} on remote storage needs --tune.name=NAME of the sweep")
    else:
        prefix = f"sweep-{info.name}-{cfg.model.backbone}-"
        found = sorted(Path(storage).glob(prefix + "*"), key=lambda p: p.stat().st_mtime)
        states = [read_state(storage, p.name) for p in reversed(found)]
        candidates = [s.name for s in states if s is not None and (grow or not s.finished)]
        if not candidates:
            which = "sweep" if grow else "unfinished sweep"
            raise TlrayError(f"{flag}: no {which} of {info.name} with {cfg.model.backbone} "
                             f"under {storage}; name one with --tune.name=NAME")
    from ray import tune

    state = read_state(storage, candidates[0])
    path = f"{storage.rstrip('/')}/{candidates[0]}"
    if state is None or not tune.Tuner.can_restore(path):
        raise TlrayError(f"{flag}: {path} holds no sweep that can be continued")
    return state
