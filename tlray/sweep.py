"""The sweep: Ray Tune over learning rate x freeze depth (and any other field) with ASHA.

`sweep(cfg)` answers the transfer-learning question "how much of the pretrained network
should I keep, at what learning rate?". Each trial is one `trainer.train` run, launched from
a Tune function trainable (the Train V2 pattern: `TuneReportCallback` forwards every epoch's
report to Tune, so ASHA can stop weak trials early). MLflow gets one parent run per sweep with
a nested child run per trial; the best completed trial's model (already tested on the test
split and logged by its trial) is registered, and the `champion` alias moves only when its
test metric beats the current champion's.

A sweep lives in `<storage>/<name>`; `resume=True` continues an interrupted one without
re-running finished trials, under the same MLflow parent run.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path


from tlray import config as config_mod
from tlray import paths, plots, registry, tracking, trainer
from tlray.config import Config
from tlray.errors import TlrayError

STATE_FILE = "tlray_sweep.json"


@dataclass
class SweepResult:
    name: str
    path: str
    parent_run_id: str
    best_config: dict  # the searched values of the winner
    best_metrics: dict  # its val and test metrics
    best_run_id: str
    model_uri: str | None
    registered: registry.RegistrationResult | None
    registered_name: str
    trials: list[dict]  # one row per trial: searched values, status, metrics


def freeze_choices(cfg: Config, group_names: tuple[str, ...]) -> list[str]:
    """The freeze depths to try: every depth from 0 to "all", or the user's list, checked."""
    n = len(group_names)
    if cfg.tune.freeze.strip() == "auto":
        return [str(k) for k in range(n)] + ["all"]
    choices = [c.strip() for c in cfg.tune.freeze.split(",") if c.strip()]
    for c in choices:
        if c != "all" and not (c.isdigit() and int(c) <= n):
            raise TlrayError(f"--tune.freeze: {c!r} is not a freeze depth of "
                             f"{cfg.model.backbone} (0..{n} or 'all'; groups: "
                             f"{', '.join(group_names)})")
    if not choices:
        raise TlrayError("--tune.freeze: empty list of freeze depths")
    return choices


def search_space(cfg: Config, choices: list[str]) -> dict:
    """Tune's param_space: flat `section.key` names, so the trial table reads like the config.

    Args:
        choices: the freeze depths to try, from `freeze_choices`.
    """
    from ray import tune

    space = {"optim.lr": tune.loguniform(cfg.tune.lr_min, cfg.tune.lr_max)
             if cfg.tune.lr_min < cfg.tune.lr_max else cfg.tune.lr_min,
             "model.freeze": tune.choice(choices)}
    for key, spec in (cfg.tune.space or {}).items():
        config_mod.load(None, [f"{key}={_example(spec)}"], base=cfg)  # the key must exist
        space[key] = _distribution(key, spec)
    return space


def spread_trials(cfg: Config, choices: list[str]) -> list[dict]:
    """`tune.num_samples` (learning rate, freeze depth) pairs that cover both axes evenly.

    A Latin hypercube: the log learning-rate range is cut into as many equal strata as there
    are trials and one rate is drawn in each; the freeze depths are taken at equal steps
    along `choices` from a random start (every depth, when there are at least as many trials
    as depths); the two are paired at random. A handful of purely random draws easily lands
    in one corner: seeded, the MNIST sweep's four drew every learning rate from the upper
    half of its range, two of them at the same depth and within 20% of each other.
    """
    import numpy as np

    t = cfg.tune
    n, k = t.num_samples, len(choices)
    rng = np.random.default_rng(t.seed)
    start = rng.uniform()
    depths = [choices[min(k - 1, math.floor((i + start) * k / n))] for i in range(n)]
    edges = np.linspace(math.log(t.lr_min), math.log(t.lr_max), n + 1)
    lrs = np.clip(np.exp(rng.uniform(edges[:-1], edges[1:])), t.lr_min, t.lr_max)
    rng.shuffle(depths)
    rng.shuffle(lrs)
    return [{"optim.lr": float(lr), "model.freeze": d} for lr, d in zip(lrs, depths)]


def _example(spec):
    if isinstance(spec, list):
        if not spec:
            raise TlrayError("--tune.space: an empty list of choices")
        return json.dumps(spec[0])
    if isinstance(spec, dict) and len(spec) == 1:
        (_, bounds), = spec.items()
        return json.dumps(bounds[0]) if isinstance(bounds, list) and bounds else "null"
    return json.dumps(spec)


def _distribution(key: str, spec):
    from ray import tune

    if isinstance(spec, list):
        return tune.choice(spec)
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, bounds), = spec.items()
        makers = {"loguniform": tune.loguniform, "uniform": tune.uniform,
                  "randint": tune.randint}
        if kind in makers and isinstance(bounds, list) and len(bounds) == 2:
            return makers[kind](*bounds)
    raise TlrayError(f"--tune.space {key}: expected a list of choices or one of "
                     f"{{loguniform|uniform|randint: [low, high]}}, got {spec!r}")


class SweepClock:
    """The sweep's remaining time, said once: when every trial that has started has
    reported its first epoch (and as many have started as run at once).

    An upper bound: every trial still to run is counted with all its epochs, at the mean
    epoch time seen so far, `concurrency` at a time; ASHA stops some early.
    """

    def __init__(self, trials: int, epochs: int, concurrency: int):
        self.trials, self.epochs = trials, epochs
        self.concurrency = max(1, min(concurrency, trials))
        self.done: dict[str, int] = {}  # trial -> epochs reported
        self.seconds: list[float] = []
        self.said = False

    def observe(self, trial: str, epoch: int, epoch_seconds: float,
                started: list[str]) -> str | None:
        """A trial's epoch report; returns the line to print, once."""
        self.done[trial] = max(self.done.get(trial, 0), epoch)
        self.seconds.append(epoch_seconds)
        if self.said or len(started) < self.concurrency or any(
                t not in self.done for t in started):
            return None
        self.said = True
        left = sum(self.epochs - self.done.get(t, 0) for t in started)
        left += self.epochs * (self.trials - len(started))
        per_epoch = sum(self.seconds) / len(self.seconds)
        from tlray.loop import format_seconds

        return (f"sweep: at most {format_seconds(left * per_epoch / self.concurrency)} left "
                f"({left} trial epochs to go at ~{per_epoch:.0f} s each, "
                f"{self.concurrency} at a time; ASHA stops some trials early)")


def _clock_callback(clock: SweepClock):
    """SweepClock as a Tune callback in the sweep's driver (epoch reports only)."""
    from ray import tune

    class SayRemaining(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "epoch_seconds" not in result or "test_acc" in result:
                return
            line = clock.observe(trial.trial_id, int(result.get("epoch", iteration)),
                                 float(result["epoch_seconds"]),
                                 [t.trial_id for t in trials if t.status != "PENDING"])
            if line:
                print(line, flush=True)

    return SayRemaining()


def run_trial(params: dict, *, base: dict, parent_run_id: str, tracking_uri: str,
              images: dict | None = None) -> None:
    """One trial, inside Tune: the base config with this trial's values, trained by Ray Train
    (in this very process when `trains_in_trial_process`), on the sweep's `images`."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    overrides = [f"{k}={json.dumps(v)}" for k, v in params.items()]
    cfg = config_mod.load(None, overrides, base=config_mod.from_plain(base))
    cfg.tracking.tracking_uri = tracking_uri
    trial_id = tune.get_context().get_trial_id()
    here = trains_in_trial_process(cfg)
    trainer.train(cfg, parent_run_id=parent_run_id,
                  callbacks=None if here else [TuneReportCallback()], in_tune_process=here,
                  extra_tags={"tune_trial_id": trial_id}, run_name=f"trial-{trial_id}",
                  images=images)


def trains_in_trial_process(cfg: Config) -> bool:
    """One-worker trials train in the trial's own process (see `tune.in_process`)."""
    return cfg.tune.in_process and cfg.scaling.num_workers == 1


def trial_resources(cfg: Config) -> dict:
    """What Tune reserves for one trial's own process: the worker's share when it trains
    there, else next to nothing (it only waits on its Train workers, which reserve theirs)."""
    return trainer.worker_resources(cfg) if trains_in_trial_process(cfg) else {"CPU": 0.01}


def trials_per_gpu(cfg: Config) -> int:
    """How many one-worker trials share a GPU: the user's number, or one from the input size.

    At 28-128 px one trial leaves an H100 launch-bound (FIELD_NOTES: ~10.9k img/s for
    EfficientNet-Lite0 at 64-128 px), so several trials per GPU raise a sweep's throughput;
    multi-worker trials keep whole GPUs (DDP across shares of one GPU gains nothing).
    """
    if cfg.scaling.num_workers > 1:
        return 1
    if cfg.tune.trials_per_gpu:
        return cfg.tune.trials_per_gpu
    size = cfg.data.image_size
    return 4 if size <= 64 else 2 if size <= 128 else 1


def share_gpus(cfg: Config) -> Config:
    """The sweep's config with `scaling.gpus_per_worker` set to one trial's share of a GPU."""
    if not cfg.scaling.use_gpu or cfg.scaling.gpus_per_worker != 1.0:
        return cfg  # no GPUs, or the user chose the share
    share = 1.0 / trials_per_gpu(cfg)
    return config_mod.load(None, [f"scaling.gpus_per_worker={share}"], base=cfg)


def concurrency(cfg: Config) -> int:
    """Trials that fit the cluster at once, from the resources one trial's workers take.

    One CPU stays free for Ray Data's read tasks: if Train workers held every CPU, the
    reads of the last trials to start would wait forever (see trainer.check_resources).
    """
    import ray

    if cfg.tune.max_concurrent:
        return cfg.tune.max_concurrent
    total = ray.cluster_resources()
    s = cfg.scaling
    by_cpu = (total.get("CPU", 0) - trainer.DATA_CPU_RESERVE) // (s.num_workers * s.cpus_per_worker)
    if s.use_gpu:
        by_gpu = total.get("GPU", 0) // (s.num_workers * s.gpus_per_worker)
        return max(1, int(min(by_gpu, by_cpu)))
    return max(1, int(by_cpu))


def sweep(cfg: Config, *, resume: bool = False, points: list[dict] | None = None
          ) -> SweepResult:
    """Runs (or resumes) a sweep and registers its winner; see the module docstring.

    Args:
        points: exactly these trials (`section.key` -> value each) instead of a search,
            e.g. the configs a sweep stopped early, trained to the end (`--regret`).
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    info = trainer.resolve_dataset(cfg.data.dataset)
    trainer.require_splits(info)
    _, minfo = trainer.check_model(cfg, info)
    choices = freeze_choices(cfg, minfo.group_names)
    space = search_space(cfg, choices)
    cfg = share_gpus(cfg)
    uri = trainer.connect(cfg)

    storage = cfg.storage_path or paths.ray_results_dir()
    # Keeping only the best checkpoints makes Tune save its experiment state after each
    # deletion, and warn about it every few seconds; a small JSON file, not a bottleneck.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Trials run in other processes, maybe on other machines: give them absolute answers
    # (the prepared dataset, the storage, the tracking store), not defaults to re-resolve.
    cfg = config_mod.load(None, [f"data.dataset={info.uri}", f"storage_path={storage}",
                                 f"tracking.tracking_uri={uri}"], base=cfg)
    name, parent_id = _sweep_name(cfg, info, storage, resume)
    sweep_dir = f"{storage.rstrip('/')}/{name}"
    registered_name = cfg.tune.registered_name or registry.default_registered_name(
        info.name, cfg.model.backbone)
    metric, mode = cfg.train.monitor, cfg.monitor_mode
    tags = {"sweep": name, "dataset": info.name, "backbone": cfg.model.backbone,
            "weights": cfg.model.weights, "dataset_hash": info.fingerprint}
    with tracking.start_run(trainer.experiment_name(cfg, info), run_name=name, tags=tags,
                            run_id=parent_id) as parent:
        parent_id = parent.info.run_id
        _write_state(sweep_dir, {"name": name, "parent_run_id": parent_id, "finished": False})
        if not resume:
            tracking.log_config(cfg.to_dict())
            import mlflow

            mlflow.log_dict({k: repr(v) for k, v in space.items()}, "search_space.json")
            mlflow.log_params({"sweep.metric": metric, "sweep.mode": mode,
                               "sweep.scheduler": "ASHA", "sweep.search": cfg.tune.search})
        # Every trial trains on the same splits: read once, here (see trainer.read_splits).
        images = trainer.read_splits(cfg, info)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=cfg.to_dict(), parent_run_id=parent_id,
                                 tracking_uri=uri, images=images),
            trial_resources(cfg))
        if resume:
            tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            trials = len(points) if points else cfg.tune.num_samples
            at_once = concurrency(cfg)
            # A trial reports once per epoch plus once with its test results (twice if it
            # is resumed from its final checkpoint). max_t stays above that count: a trial
            # that reaches max_t is stopped at once, which would kill it while it still logs
            # its model.
            scheduler = ASHAScheduler(time_attr="training_iteration",
                                      max_t=cfg.train.epochs + 3,
                                      grace_period=cfg.tune.grace_period,
                                      reduction_factor=cfg.tune.reduction_factor)
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler,
                                            num_samples=trials,
                                            # The next trial starts in the process the last
                                            # one ended in (torch, timm, tlray imported).
                                            reuse_actors=True,
                                            search_alg=_search_alg(
                                                cfg, metric, mode, at_once, choices,
                                                points)),
                run_config=tune.RunConfig(
                    name=name, storage_path=storage,
                    callbacks=[_clock_callback(SweepClock(trials, cfg.train.epochs,
                                                          at_once))],
                    # Checkpoints of trials that train in their own process (see run_trial).
                    checkpoint_config=tune.CheckpointConfig(
                        num_to_keep=cfg.train.keep_checkpoints,
                        checkpoint_score_attribute=metric, checkpoint_score_order=mode),
                    failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures)))
        results = tuner.fit()
        tracking.close_dangling_runs(parent_run_id=parent_id, status="KILLED")
        outcome = _pick_and_register(cfg, info, results, parent_id, registered_name, metric,
                                     mode)
        _log_sweep(outcome["trials"], metric)
        _write_state(sweep_dir, {"name": name, "parent_run_id": parent_id, "finished": True})
    return SweepResult(name=name, path=sweep_dir, parent_run_id=parent_id,
                       registered_name=registered_name, **outcome)


def _search_alg(cfg: Config, metric: str, mode: str, max_concurrent: int,
                choices: list[str], points: list[dict] | None = None):
    """Seeded search, at most `max_concurrent` trials at once (Tune ignores its own
    max_concurrent_trials for a search generator passed in, hence here)."""
    if points or cfg.tune.search in ("stratified", "random"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune runs the given points first, each one trial, drawing any field they leave out.
        if not points:
            points = spread_trials(cfg, choices) if cfg.tune.search == "stratified" else None
        return BasicVariantGenerator(points_to_evaluate=points, random_state=cfg.tune.seed,
                                     max_concurrent=max_concurrent)
    try:
        from ray.tune.search.optuna import OptunaSearch
        import optuna  # noqa: F401  (OptunaSearch imports it lazily)
    except ImportError:
        raise TlrayError("--tune.search=optuna needs the optuna package "
                         "(pip install optuna), or use --tune.search=random") from None
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter(OptunaSearch(metric=metric, mode=mode, seed=cfg.tune.seed),
                              max_concurrent=max_concurrent)


def _pick_and_register(cfg, info, results, parent_id, registered_name, metric, mode) -> dict:
    """The best trial by its best validation metric; only completed trials have been tested."""
    from mlflow import MlflowClient

    client = MlflowClient()
    # Oldest first, so that a retried trial's last attempt (the one that finished) wins.
    children = {r.data.tags.get("tune_trial_id"): r for r in client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_id}'", max_results=10_000,
        order_by=["attributes.start_time ASC"])}
    trials, best = [], None
    best_key = f"best_{metric}"
    for result in results:
        m = result.metrics or {}
        searched = {k: v for k, v in (result.config or {}).items()}
        child = children.get(m.get("trial_id"))
        if child is not None and result.error is None and child.info.status == "FAILED":
            # ASHA stopped this trial; stopping it broke its Train run mid-way, which the trial
            # recorded as a failure. It was killed, not broken.
            tracking.end_run_with_status(child.info.run_id, "KILLED")
        row = {"trial_id": m.get("trial_id"), **searched,
               "status": "ERROR" if result.error else (
                   "COMPLETED" if "test_acc" in m else "STOPPED"),
               "epochs": m.get("epochs_run", m.get("epoch")),
               metric: m.get(best_key, m.get(metric)),
               "test_acc": m.get("test_acc"), "test_auc": m.get("test_auc"),
               "seconds": m.get("time_total_s"),  # the whole trial, start-up included
               "epochs_seconds": m.get("epochs_seconds"),  # its epochs (train + validation)
               "mlflow_run_id": child.info.run_id if child else None,
               "model_uri": child.data.tags.get("model_uri") if child else None}
        trials.append(row)
        if row["status"] == "COMPLETED" and row[metric] is not None:
            better = best is None or (row[metric] < best[metric] if mode == "min"
                                      else row[metric] > best[metric])
            best = row if better else best
    if best is None:
        errors = [str(r.error).splitlines()[0] for r in results if r.error]
        raise TlrayError("no trial of the sweep completed" +
                         (f"; first error: {errors[0]}" if errors else ""))
    best_result = next(r for r in results if (r.metrics or {}).get("trial_id") == best["trial_id"])
    best_metrics = {k: v for k, v in best_result.metrics.items()
                    if k.startswith(("val_", "test_", "best_", "train_"))}
    registered = None
    if best["model_uri"]:
        registered = _register(cfg, info, registered_name, best_result.metrics,
                               client.get_run(best["mlflow_run_id"]), len(trials))
    return {"best_config": {k: best[k] for k in best_result.config},
            "best_metrics": best_metrics, "best_run_id": best["mlflow_run_id"],
            "model_uri": best["model_uri"], "registered": registered, "trials": trials}


def _register(cfg: Config, info, registered_name: str, metrics: dict, run,
              trials: int) -> registry.RegistrationResult:
    """The winner as a new version: plain tags, the alias if it beats the champion, and a
    description a person can choose by in the MLflow UI."""
    p, champion = run.data.params, cfg.tune.champion_metric
    val = {k: metrics.get(f"val_{k}") for k in ("acc", "auc", "loss")}
    test = {k: metrics.get(f"test_{k}") for k in ("acc", "auc", "loss")}
    lr, freeze = float(p["optim.lr"]), p["model.freeze"]
    tags = {**{f"val_{k}": v for k, v in val.items()}, **{f"test_{k}": v for k, v in test.items()},
            "backbone": p["model.backbone"], "weights": p["model.weights"],
            "freeze_depth": p.get("model.freeze_depth", freeze), "lr": f"{lr:.4g}",
            "epochs": metrics.get("epochs_run"), "dataset": info.name,
            "dataset_hash": info.fingerprint, "run_id": run.info.run_id,
            "sweep_run_id": run.data.tags.get("mlflow.parentRunId")}
    result = registry.register_champion(
        run.data.tags["model_uri"], registered_name, champion, metrics[champion],
        higher_is_better=config_mod.CHAMPION_METRICS[champion] == "max", tags=tags)
    splits = ", ".join(f"{info.splits[s].rows:,} {s}" for s in ("train", "val", "test"))
    facts = {
        "summary": f"{p['model.backbone']} ({p['model.weights']} weights), freeze {freeze}, "
                   f"lr {lr:.3g}, on {info.name}: test accuracy {_fmt(test['acc'])}",
        "Dataset": f"`{info.name}` (hash `{info.fingerprint[:12]}`), {splits} images of "
                   f"{info.height}x{info.width} {info.mode}, {info.num_classes} classes; "
                   f"from {info.source.get('uri', '?')}",
        "Backbone": f"{p['model.backbone']}, weights `{p['model.weights']}`, freeze depth "
                    f"{freeze} ({int(p['model.trainable_params']):,} of "
                    f"{int(p['model.total_params']):,} parameters trained)",
        "Training": f"lr {lr:.3g} ({p['optim.name']}, {p['optim.schedule']} schedule), "
                    f"{_fmt(metrics.get('epochs_run'))} of {p['train.epochs']} epochs, best "
                    f"epoch {_fmt(metrics.get('best_epoch'))} by {cfg.train.monitor}, batch "
                    f"{p['data.batch_size']}, input {p['data.image_size']} px",
        "Chosen": f"best of {trials} sweep trials by {cfg.train.monitor}; MLflow run "
                  f"`{run.info.run_id}` ({run.info.run_name})",
    }
    registry.describe_version(registered_name, result.version, registry.version_description(
        registered_name, result.version, facts=facts, val=val, test=test,
        alias=registry.alias_note(result, champion, metrics[champion])))
    return result


def _log_sweep(trials: list[dict], metric: str) -> None:
    """The results table, the sweep plot and the winner, on the parent run."""
    import mlflow
    import pandas as pd

    frame = pd.DataFrame(trials)
    mlflow.log_text(frame.to_csv(index=False), "sweep_results.csv")
    rows = [{"lr": t["optim.lr"], "freeze_depth": t["model.freeze"], metric: t[metric]}
            for t in trials if t.get(metric) is not None and "optim.lr" in t]
    if rows:
        tracking.log_figure(plots.sweep_plot(rows, metric), "plots/sweep.png")


def _sweep_name(cfg: Config, info, storage: str, resume: bool) -> tuple[str, str | None]:
    """(name, parent run id to continue): a fresh name, or the sweep to resume."""
    if not resume:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return cfg.tune.name or f"sweep-{info.name}-{cfg.model.backbone}-{stamp}", None
    if "://" in storage:
        if not cfg.tune.name:
            raise TlrayError("--resume on remote storage needs --tune.name=NAME of the sweep")
        candidates = [cfg.tune.name]
    elif cfg.tune.name:
        candidates = [cfg.tune.name]
    else:
        prefix = f"sweep-{info.name}-{cfg.model.backbone}-"
        found = sorted(Path(storage).glob(prefix + "*"), key=lambda p: p.stat().st_mtime)
        candidates = [p.name for p in reversed(found)
                      if not _read_state(f"{storage}/{p.name}").get("finished", True)]
        if not candidates:
            raise TlrayError(f"--resume: no unfinished sweep of {info.name} with "
                             f"{cfg.model.backbone} under {storage}; name one with "
                             f"--tune.name=NAME")
    from ray import tune

    name = candidates[0]
    path = f"{storage.rstrip('/')}/{name}"
    if not tune.Tuner.can_restore(path):
        raise TlrayError(f"--resume: {path} holds no sweep that can be resumed")
    return name, _read_state(path).get("parent_run_id")


def _write_state(sweep_dir: str, state: dict) -> None:
    from tlray.datasets import filesystem

    fs, path = filesystem(sweep_dir)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{STATE_FILE}") as f:
        f.write(json.dumps(state).encode())


def _read_state(sweep_dir: str) -> dict:
    from tlray.datasets import filesystem

    fs, path = filesystem(sweep_dir)
    try:
        with fs.open_input_stream(f"{path}/{STATE_FILE}") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return {}


def format_summary(result: SweepResult, monitor: str) -> str:
    m = result.best_metrics
    searched = ", ".join(f"{k}={_fmt(v)}" for k, v in result.best_config.items())
    lines = [f"sweep {result.name}: {len(result.trials)} trials "
             f"({sum(t['status'] == 'COMPLETED' for t in result.trials)} completed, "
             f"{sum(t['status'] == 'STOPPED' for t in result.trials)} stopped early by ASHA)",
             f"best trial: {searched}",
             f"  best {monitor} {_fmt(m.get(f'best_{monitor}'))}  val_acc "
             f"{_fmt(m.get('val_acc'))}",
             f"  test  acc {_fmt(m.get('test_acc'))}  auc {_fmt(m.get('test_auc'))}  "
             f"loss {_fmt(m.get('test_loss'))}"]
    if result.registered is not None:
        r = result.registered
        lines.append(f"registered: models:/{result.registered_name}/{r.version}; champion is "
                     f"version {r.champion_version}"
                     + (" (moved to this one)" if r.moved else " (kept: not beaten)"))
        lines.append(f"load it: mlflow.pyfunc.load_model('models:/{result.registered_name}"
                     f"@champion').predict(images); serve it: mlflow models serve -m "
                     f"models:/{result.registered_name}@champion --env-manager local -p 5001")
    lines.append(f"MLflow parent run {result.parent_run_id}: {tracking.ui_command()}")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else "nan"
    return str(v)
