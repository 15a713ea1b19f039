"""One training run on Ray Train: checks first, then a TorchTrainer, then MLflow artifacts.

`train(cfg)` is the whole unit a sweep trial repeats. In order:
  1. resolve the dataset (preparing a source if needed) and build the model once on the
     driver, so a bad backbone, weight source or freeze depth fails before Ray reserves
     anything; check the cluster can hold the workers;
  2. open an MLflow run (never left RUNNING) and log the resolved config and dataset.json;
  3. run `loop.train_loop_per_worker` on N workers with Ray Data shards, checkpoints kept
     by the monitored metric, and restarts from the last checkpoint after a worker failure;
  4. log what the final checkpoint holds: learning curves, confusion matrix, test metrics,
     a predictions grid and the best model (with signature and input example).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tlray import augment, logged_model, paths, plots, tracking
from tlray.config import Config
from tlray.datasets import DatasetInfo, load_info, prepare
from tlray.errors import TlrayError
from tlray.models import ModelInfo, build_model
from tlray.session import init_ray, quiet_logging_config
from tlray.threads import own_threads


@dataclass
class TrainResult:
    """What a finished run produced, and where to find it."""

    metrics: dict  # best epoch's metrics plus test_* metrics
    history: list[dict]
    checkpoint_path: str  # the final checkpoint: best weights + test results
    run_id: str | None
    model_uri: str | None
    dataset: DatasetInfo


def resolve_dataset(spec: str, *, progress: bool = True) -> DatasetInfo:
    """A prepared dataset directory as is; anything else is treated as a source and prepared
    (idempotently) under $TLRAY_HOME/datasets."""
    if "://" in spec or (Path(spec).expanduser() / "dataset.json").exists():
        info = load_info(spec)
        if info.features is not None:
            raise TlrayError(f"{spec} is a feature cache of {info.source['uri']}, not a dataset "
                             f"of images; train on that dataset (its cache is found by itself)")
        return info
    return prepare(spec, progress=progress)


def check_model(cfg: Config, info: DatasetInfo) -> tuple[torch.nn.Module, ModelInfo]:
    """Builds the model once on the driver: every model error surfaces before Ray starts.

    Seeded as the training loop seeds it, so that randomly initialised weights (and the
    feature cache keyed on them) are the ones the workers will train.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return build_model(cfg.model.backbone, info.num_classes, in_chans=info.channels,
                           img_size=cfg.data.image_size, weights=cfg.model.weights,
                           head=cfg.model.head, freeze=cfg.model.freeze,
                           drop_rate=cfg.model.drop_rate)


# CPUs left to Ray Data's read tasks beside the Train workers; without it they can starve.
DATA_CPU_RESERVE = 0.5


def worker_resources(cfg: Config) -> dict:
    """What one training worker reserves: its CPUs and, with GPUs, its share of one."""
    s = cfg.scaling
    return {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}


def check_resources(cfg: Config) -> None:
    """Fails fast, instead of waiting forever, when the cluster cannot hold the workers."""
    import ray

    total = ray.cluster_resources()
    s = cfg.scaling
    if s.use_gpu and total.get("GPU", 0) < s.gpus_per_worker:
        raise TlrayError(f"--scaling.use_gpu=true but the Ray cluster has "
                         f"{total.get('GPU', 0):g} GPUs; run on a GPU cluster or set "
                         f"--scaling.use_gpu=false")
    if s.use_gpu and total.get("GPU", 0) < s.num_workers * s.gpus_per_worker:
        raise TlrayError(f"{s.num_workers} workers x {s.gpus_per_worker:g} GPU need "
                         f"{s.num_workers * s.gpus_per_worker:g} GPUs; the cluster has "
                         f"{total.get('GPU', 0):g}")
    need_cpu = s.num_workers * s.cpus_per_worker + DATA_CPU_RESERVE
    if total.get("CPU", 0) < need_cpu:
        raise TlrayError(f"{s.num_workers} workers x {s.cpus_per_worker:g} CPU, plus "
                         f"{DATA_CPU_RESERVE:g} for reading data, need {need_cpu:g} CPUs; the "
                         f"cluster has {total.get('CPU', 0):g} (use fractional "
                         f"--scaling.cpus_per_worker, e.g. 0.5)")


def connect(cfg: Config) -> str:
    """Tracking and cluster checks every command does before it starts work.

    Points MLflow at the configured store (failing fast if a server is unreachable), joins
    or starts Ray, and checks that the workers fit. Returns the tracking URI.
    """
    if cfg.tracking.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = cfg.tracking.tracking_uri
    uri = tracking.configure()
    tracking.check_tracking_server(uri)
    init_ray()
    check_resources(cfg)
    return uri


def require_splits(info: DatasetInfo) -> None:
    missing = [s for s in ("train", "val", "test") if s not in info.splits]
    if missing:
        raise TlrayError(f"dataset {info.uri} has no {missing[0]!r} split; prepare it with "
                         f"train, val and test fractions")


def experiment_name(cfg: Config, info: DatasetInfo) -> str:
    return cfg.tracking.experiment or f"tlray-{info.name}"


def train(cfg: Config, *, parent_run_id: str | None = None, extra_tags: dict | None = None,
          callbacks: list | None = None, run_name: str | None = None,
          in_tune_process: bool = False, images: dict | None = None) -> TrainResult:
    """Runs one configuration to completion and logs it to MLflow.

    Args:
        cfg: a validated config (see `tlray.config.load`).
        parent_run_id: nests this run under a sweep's parent run.
        callbacks: extra Ray Train callbacks (a sweep passes Tune's reporting callback).
        run_name: MLflow/Ray run name (default: from the config).
        in_tune_process: train right here, in a Tune trial's process that holds one worker's
            resources (Ray Train's local mode); the loop reports to Tune itself.
        images: the dataset's splits from `read_splits`, when the caller (a sweep) read them
            once for all its runs; read here otherwise.
    """
    info = resolve_dataset(cfg.data.dataset)
    require_splits(info)
    model, minfo = check_model(cfg, info)
    uri = connect(cfg)
    cache, cache_note = feature_cache(cfg, info, model, minfo, here=in_tune_process)
    if cache is not None:
        role = ("validating" if augment.from_config(cfg.data).enabled else "training")
        print(f"feature cache: {role} what follows {cache.features['cut']} from {cache.uri}",
              flush=True)

    tags = {**tracking.standard_tags(cfg.model.backbone, cfg.model.weights, minfo.freeze_depth,
                                     info.fingerprint),
            "dataset": info.name, **(extra_tags or {})}
    name = run_name or cfg.tracking.run_name or f"{cfg.model.backbone}-f{cfg.model.freeze}"
    if cfg.tracking.log_model and cfg.tracking.evaluate != "never":
        logged_model.import_evaluators()  # before the system-metrics thread below starts
    # CPU, memory (and GPU, where there is one) of this process's machine, as system/* metrics.
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # 4 lines per run
    with tracking.start_run(experiment_name(cfg, info), run_name=name, tags=tags,
                            parent_run_id=parent_run_id) as run:
        run_id = run.info.run_id
        tracking.log_config(cfg.to_dict())
        import mlflow

        mlflow.log_params({"model.trainable_params": minfo.trainable_params,
                           "model.total_params": minfo.total_params,
                           "model.freeze_depth": minfo.freeze_depth})
        mlflow.log_dict(info.to_json(), "dataset.json")
        data = tracking.log_datasets(info)
        # Which cache the run used (or "not used: why"), and why it chose what it chose.
        mlflow.set_tags({"feature_cache": cache.uri if cache else cache_note,
                         "feature_cache_reason": cache_note})
        # A sweep's trials print side by side: their progress lines carry the trial's name.
        checkpoint = _fit(cfg, info, run_id, uri, name, callbacks, cache, in_tune_process,
                          images, progress_label=name if parent_run_id else None)
        with checkpoint.as_directory() as d:
            outcome = _log_final(Path(d), cfg, info, model, minfo, data["test"])
    return TrainResult(metrics=outcome["metrics"], history=outcome["history"],
                       checkpoint_path=checkpoint.path, run_id=run_id,
                       model_uri=outcome["model_uri"], dataset=info)


def feature_cache(cfg: Config, info: DatasetInfo, model: torch.nn.Module, minfo: ModelInfo,
                  *, here: bool = False) -> tuple[DatasetInfo | None, str]:
    """The frozen-front feature cache this run trains from (None: images), and why.

    A missing cache is built now by a Ray task with one Train worker's resources (its GPU
    too), or in this process when it holds those resources itself (`here`), and kept under
    `<storage>/feature_cache` for every later run and sweep trial with the same data,
    weights, freeze depth and input size. In a sweep the first trial of a
    freeze depth builds it; trials of that depth started at the same moment may each build
    it (the results are identical; the first one finished is kept).

    Args:
        model, minfo: the run's model from `check_model`.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from tlray import features

    split, why = features.choose(cfg.train.feature_cache, model,
                                 minfo.data_config["input_size"], info,
                                 cfg.data.cache_gb * 2**30)
    if split is None:
        return None, why
    key = features.cache_key(split, info, minfo.data_config, cfg.data.image_size)
    cache_uri = features.cache_uri(_feature_cache_root(cfg), key)
    found = features.existing(cache_uri)
    if augment.from_config(cfg.data).enabled:
        # Augmented training images change every epoch: training runs the whole model on
        # them, and only validation may read the cached front.
        if found is None and cfg.train.feature_cache == "auto":
            return None, ("not used: training images are augmented (the cached front would "
                          "be the wrong input for them), and a cache only for validation "
                          "does not pay for its building (train.feature_cache=always builds "
                          "one)")
        why = f"validation only: {why} (training images are augmented)"
    if found is not None:
        return found, why
    print(f"feature cache: computing the {why} (freeze {cfg.model.freeze})", flush=True)
    if here:
        return load_info(_build_feature_cache(cfg.to_dict(), info.uri, cache_uri, key)), why
    s = cfg.scaling
    build = ray.remote(_build_feature_cache).options(
        num_cpus=s.cpus_per_worker, num_gpus=s.gpus_per_worker if s.use_gpu else 0,
        # Outside the caller's placement group (a Tune trial's holds 0.01 CPU).
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    try:
        ray.get(build.remote(cfg.to_dict(), info.uri, cache_uri, key))
    except Exception as e:  # Ray wraps the task's error; show its root cause
        raise TlrayError(f"building the feature cache failed: {_root_cause(e)}") from e
    return load_info(cache_uri), why


def _feature_cache_root(cfg: Config) -> str:
    return f"{(cfg.storage_path or str(paths.ray_results_dir())).rstrip('/')}/feature_cache"


def _build_feature_cache(cfg_dict: dict, dataset_uri: str, cache_uri: str, key: str) -> str:
    """Ray task: one cache, computed where a Train worker would run."""
    from tlray import config as config_mod
    from tlray import features

    cfg = config_mod.from_plain(cfg_dict)
    info = load_info(dataset_uri)
    model, minfo = check_model(cfg, info)
    split = features.split_model(model, minfo.data_config["input_size"])
    if split is None or features.cache_key(split, info, minfo.data_config,
                                           cfg.data.image_size) != key:
        raise TlrayError(f"the weights of {cfg.model.backbone} ({cfg.model.weights}) changed "
                         f"while the feature cache was being planned; run again")
    cuda = cfg.scaling.use_gpu and torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(own_threads(cfg.scaling.cpus_per_worker))
    built = features.build(split, info, cache_uri, mean=minfo.data_config["mean"],
                           std=minfo.data_config["std"], size=cfg.data.image_size,
                           device="cuda" if cuda else "cpu", amp=cuda and cfg.train.amp,
                           channels_last=cfg.train.channels_last)
    return built.uri


SPLITS = ("train", "val", "test")


def read_splits(cfg: Config, info: DatasetInfo, splits=SPLITS) -> dict:
    """A dataset's splits as Ray Datasets, in shard order: each read into Ray's object store
    once, now, when it fits `data.cache_gb`, else streamed from Parquet every epoch.

    A sweep reads its images once and hands them to all its trials, so that they neither
    read the same shards again nor keep a copy each in the object store.
    """
    from tlray.ingest import read_split

    return {name: read_split(info, name,
                             cache=info.split_bytes(name) <= cfg.data.cache_gb * 2**30)
            for name in splits}


def _fit(cfg: Config, info: DatasetInfo, run_id: str, tracking_uri: str, name: str,
         callbacks: list | None, cache: DatasetInfo | None = None,
         in_tune_process: bool = False, images: dict | None = None,
         progress_label: str | None = None):
    """Runs the Ray Train run; returns its final checkpoint (best weights, history, test).

    In a Tune trial's own process, Train's local mode (`num_workers=0`) runs the loop here
    without a controller or workers; its reports go straight to Tune, which persists their
    checkpoints in the trial's directory (local mode would only hand back a temporary one).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from tlray.ingest import exact_split_data_config
    from tlray.loop import train_loop_per_worker

    s = cfg.scaling
    # Train and val come from the feature cache when there is one (val only when training
    # images are augmented); test is always evaluated on images, by the whole model.
    cached = ("val",) if augment.from_config(cfg.data).enabled else ("train", "val")
    datasets = read_splits(cfg, cache, cached) if cache else {}
    images = images or read_splits(cfg, info, [n for n in SPLITS if n not in datasets])
    datasets.update({n: images[n] for n in SPLITS if n not in datasets})
    # The training blocks' order, seeded: the same run sees the same batches.
    datasets["train"] = datasets["train"].randomize_block_order(seed=cfg.train.seed)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "dataset_uri": info.uri,
                           "mlflow_run_id": run_id, "tracking_uri": tracking_uri,
                           "features_uri": cache.uri if cache else None,
                           "interactive": sys.stdout.isatty(),
                           "progress_label": progress_label,
                           "report_to_tune": in_tune_process,
                           # Names a run across restarts: Train keeps the MLflow run when it
                           # restarts a worker; Tune retries a trial in a new one.
                           "restart_key": name if in_tune_process else run_id},
        scaling_config=ray.train.ScalingConfig(num_workers=0, use_gpu=s.use_gpu)
        if in_tune_process else ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu,
            resources_per_worker=worker_resources(cfg),
            placement_strategy=s.placement_strategy),
        run_config=ray.train.RunConfig(
            name=f"{name}-{run_id[:8]}",
            storage_path=cfg.storage_path or str(paths.ray_results_dir()),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=cfg.train.monitor,
                checkpoint_score_order=cfg.monitor_mode),
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            logging_config=quiet_logging_config(),
            callbacks=callbacks or None),
        datasets=datasets,
        dataset_config=exact_split_data_config(),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; show the user the root cause
        raise TlrayError(f"training failed: {_root_cause(e)}") from e
    if result.error is not None:
        raise TlrayError(f"training failed: {_root_cause(result.error)}") from result.error
    if in_tune_process:
        from ray import tune

        checkpoint = tune.get_checkpoint()  # the last one reported, as Tune persisted it
    else:
        checkpoint = result.checkpoint
    if checkpoint is None:
        raise TlrayError("training finished without a checkpoint")
    return checkpoint


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def _log_final(d: Path, cfg: Config, info: DatasetInfo, model: torch.nn.Module,
               minfo: ModelInfo, test_data) -> dict:
    """Logs the final checkpoint's contents to the active MLflow run.

    `model` is the run's architecture from `check_model`; the checkpoint's weights replace all
    of its own. The logged model gets the best epoch's validation metrics and the test
    metrics (which are also linked to the test split, `test_data`).
    """
    import mlflow

    from tlray.loop import TEST_PREDICTIONS

    state = json.loads((d / "state.json").read_text())
    test = json.loads((d / "test.json").read_text())
    history = state["history"]
    best = history[state["best_epoch"] - 1] if state["best_epoch"] else history[-1]
    test_metrics = {"test_loss": test["loss"], "test_acc": test["acc"], "test_auc": test["auc"]}
    result_metrics = {**best, "best_epoch": state["best_epoch"],
                      "stopped_early": state["stopped_early"], "epochs_run": state["epoch"],
                      **test_metrics}
    tracking.log_figure(plots.learning_curves(history), "plots/learning_curves.png")
    cm = np.array(test["confusion_matrix"])
    tracking.log_figure(plots.confusion_matrix_plot(cm, info.classes),
                        "plots/confusion_matrix.png")
    mlflow.log_dict(test, "test_metrics.json")
    mlflow.log_artifact(str(d / TEST_PREDICTIONS))
    mlflow.log_metrics({f"test_acc_{c}": v for c, v in test["per_class_acc"].items()
                        if v == v})
    if (d / "test_samples.npz").exists():
        samples = np.load(d / "test_samples.npz", allow_pickle=False)
        tracking.log_figure(plots.predictions_grid(samples["images"], samples["labels"],
                                                   samples["preds"], info.classes),
                            "plots/test_predictions.png")
    model_uri = model_id = None
    if cfg.tracking.log_model:
        model.load_state_dict(torch.load(d / "model.pt", map_location="cpu", weights_only=True))
        logged = logged_model.log_model(
            model, model_example_images(info), info.classes,
            {"mean": minfo.data_config["mean"], "std": minfo.data_config["std"],
             "size": [cfg.data.image_size] * 2, "channels": info.channels})
        model_uri, model_id = logged.model_uri, logged.model_id
        mlflow.set_tag("model_uri", model_uri)
        # The best epoch's metrics go with the model: its weights are that epoch's.
        tracking.link_metrics(mlflow.active_run().info.run_id, model_id, list(best),
                              state["best_epoch"] or state["epoch"])
    finite = {k: v for k, v in test_metrics.items() if np.isfinite(v)}
    mlflow.log_metrics(finite, step=state["epoch"], model_id=model_id, dataset=test_data)
    if model_uri is not None:
        mlflow.set_tag("mlflow_evaluate", logged_model.evaluate(
            model_uri, model_id, info, cfg.data.image_size, cfg.tracking.evaluate))
    return {"metrics": result_metrics, "history": history, "model_uri": model_uri}


def model_example_images(info: DatasetInfo) -> np.ndarray:
    """Two real validation images as the dataset stores them: the logged model's example."""
    from tlray.datasets import sample_per_class

    images, _ = sample_per_class(info, "val", per_class=1)
    return images[:2].copy()


def summary(result: TrainResult, monitor: str) -> str:
    m = result.metrics
    lines = [f"best epoch {m['best_epoch']} of {m['epochs_run']}"
             + (" (stopped early)" if m["stopped_early"] else ""),
             f"  val   loss {m['val_loss']:.4f}  acc {m['val_acc']:.4f}  auc {m['val_auc']:.4f}",
             f"  test  loss {m['test_loss']:.4f}  acc {m['test_acc']:.4f}  "
             f"auc {m['test_auc']:.4f}",
             f"checkpoint: {result.checkpoint_path}",
             f"MLflow run: {result.run_id}  ({tracking.ui_command()})"]
    if result.model_uri:
        lines.append(f"model: {result.model_uri}")
    return "\n".join(lines)
