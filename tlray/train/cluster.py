"""Connecting to Ray: one place that starts or joins a cluster the way tlray needs it, and
that knows what a run's workers reserve on it.

Joins the cluster in `RAY_ADDRESS` (set by `ray job submit`) or starts a local one, quiets
the per-task chatter of Ray Data and Ray Train so that a person sees one line per epoch,
and hands tlray's settings (TLRAY_HOME, MLflow) to every worker process.
"""

from __future__ import annotations

import logging
import os
import re
from importlib import resources

from tlray.errors import TlrayError
from tlray.train.progress import PROGRESS_LINES

FORWARDED_ENV = ("TLRAY_HOME", "MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", "HF_HOME",
                 "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
# Ray Train's controller looks at its workers every 2 s by default; every run's start and end
# (and every epoch's report reaching Tune) waits for that look. 0.2 s costs nothing visible.
TRAIN_POLL_INTERVAL_S = "0.2"


def ray_data_logging_config() -> str:
    return str(resources.files("tlray.train") / "ray_data_logging.yaml")


def in_ray_actor() -> bool:
    """Whether this process runs a Ray actor (a sweep's trial, a Train worker), not a driver."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def init_ray(num_cpus: int | None = None, **kwargs) -> None:
    """`ray.init` unless already connected; local clusters get `num_cpus` logical CPUs."""
    import ray

    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", ray_data_logging_config())
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_INTERVAL_S)
    tidy_worker_lines()
    quiet_mlflow()
    if not ray.is_initialized():
        env = {k: os.environ[k] for k in FORWARDED_ENV + ("RAY_DATA_LOGGING_CONFIG",)
               if k in os.environ}
        # Workers log MLflow's notes (input example validated, active model set, dataset
        # inferred) at INFO, which Ray forwards to the console after tlray's own summary.
        env.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        local = "RAY_ADDRESS" not in os.environ and "address" not in kwargs
        if local:
            # A cluster of tlray's own keeps Ray's token authentication on, and says nothing
            # about it: Ray's notice on an unset mode ("set RAY_AUTH_MODE=disabled to opt
            # out") would invite a newcomer to turn security off on the first screen.
            logging.getLogger("ray._private.authentication.authentication_token_setup"
                              ).addFilter(_TokenNoticeFilter())
        # Under `ray job submit --runtime-env-json '{"env_vars": {...}}'` the job's runtime env
        # may set the same variables; Ray refuses a driver runtime env that repeats one ("Failed
        # to merge the Job's runtime env") unless told that the driver's values win.
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
            os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(num_cpus=num_cpus if local else None, logging_level="ERROR",
                 logging_config=ray.LoggingConfig(log_level="WARNING"),
                 runtime_env={"env_vars": env}, **kwargs)
        start_data_stats_actor()
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def quiet_mlflow() -> None:
    """MLflow's INFO notes and its bars for the small artifacts tlray reads back stay out
    of the console (a user's MLFLOW_LOGGING_LEVEL wins)."""
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# What Ray's worker processes print at every run that asks nothing of a tlray user (it stays
# in Ray's log files): Ray Train's controller, on the preemption watcher it starts itself,
# "Actor with class name: 'PreemptionWatcher' ... has constructor arguments in the object
# store and max_restarts > 0" (ray-project/ray#53727), an error line mid-run of a good run.
RAY_NOISE = r"Actor with class name: 'PreemptionWatcher' .*has constructor arguments"


def tidy_worker_lines() -> None:
    """The workers' lines as Ray's driver prints them: lines matching `PROGRESS_LINES` pass
    unfolded, lines matching `RAY_NOISE` not at all (a user's RAY_DEDUP_LOGS_ALLOW_REGEX or
    RAY_DEDUP_LOGS_SKIP_REGEX wins).

    Ray folds lines from different processes that differ only in their numbers into one
    ("[repeated 2x across cluster]"); two sweep trials' epoch lines are just that."""
    from ray._private import ray_logging

    for attribute, variable, pattern in (
            ("allow_re", "RAY_DEDUP_LOGS_ALLOW_REGEX", PROGRESS_LINES),
            ("skip_re", "RAY_DEDUP_LOGS_SKIP_REGEX", RAY_NOISE)):
        if variable not in os.environ:
            for deduplicator in (ray_logging.stdout_deduplicator,
                                 ray_logging.stderr_deduplicator):
                setattr(deduplicator, attribute, re.compile(pattern))


def start_data_stats_actor() -> None:
    """Starts Ray Data's statistics actor (one per cluster) from the driver, outside every
    placement group.

    Otherwise the first process to run a Dataset starts it: in a sweep, a Tune trial, inside
    the trial's placement group, so it dies with that trial. Its successor knows none of the
    datasets the running trials registered, and Ray prints a `KeyError` traceback for each.
    """
    try:
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:  # a Ray that no longer has it: nothing to start
        return
    get_or_create_stats_actor()


def quiet_logging_config():
    """For Ray Train's RunConfig: Train's own INFO lines stay in its log files."""
    import ray.train

    return ray.train.LoggingConfig(log_level="WARNING")


def quiet_train_worker() -> None:
    """In a Train worker: no console line per report. Ray Train V2 logs each report at INFO
    under a logger named after its source file, which `LoggingConfig(log_level=...)` misses."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class KnownNoiseFilter:
    """Keeps two of Ray Data's console warnings that mean nothing in a tlray run out of the
    console (they stay in Ray's log files): that progress bars are off (tlray turns them off
    for one line per epoch) and that no CPU is free at the moment a sweep's trials, which
    hold their CPUs themselves, start reading (their read tasks run in the CPU tlray leaves
    free, a moment later)."""

    HIDDEN = ("Progress bars disabled", "does not have any available CPUs")

    def filter(self, record) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.HIDDEN)


class _TokenNoticeFilter(KnownNoiseFilter):
    HIDDEN = ("Token authentication is enabled",)


# CPUs left to Ray Data's read tasks beside the Train workers; without it they can starve.
DATA_CPU_RESERVE = 0.5


def worker_resources(scaling) -> dict:
    """What one training worker reserves: its CPUs and, with GPUs, its share of one.

    Args:
        scaling: the config's `scaling` section.
    """
    return {"CPU": scaling.cpus_per_worker,
            **({"GPU": scaling.gpus} if scaling.use_gpu else {})}


def train_workers(scaling) -> int | tuple[int, int]:
    """Ray Train's `num_workers`: a count, or (fewest, most) for an elastic run."""
    return (scaling.min_workers, scaling.max_workers) if scaling.elastic else scaling.max_workers


def check_resources(scaling) -> None:
    """Fails fast, instead of waiting forever, when the cluster cannot hold the workers."""
    import ray

    total = ray.cluster_resources()
    s = scaling
    if s.use_gpu and total.get("GPU", 0) < s.gpus:
        raise TlrayError(f"--scaling.use_gpu=true but the Ray cluster has "
                         f"{total.get('GPU', 0):g} GPUs; run on a GPU cluster or set "
                         f"--scaling.use_gpu=false")
    n = s.min_workers  # an elastic run starts once its fewest workers fit
    if s.use_gpu and total.get("GPU", 0) < n * s.gpus:
        raise TlrayError(f"{n} workers x {s.gpus:g} GPU need "
                         f"{n * s.gpus:g} GPUs; the cluster has "
                         f"{total.get('GPU', 0):g}")
    need_cpu = n * s.cpus_per_worker + DATA_CPU_RESERVE
    if total.get("CPU", 0) < need_cpu:
        raise TlrayError(f"{n} workers x {s.cpus_per_worker:g} CPU, plus "
                         f"{DATA_CPU_RESERVE:g} for reading data, need {need_cpu:g} CPUs; the "
                         f"cluster has {total.get('CPU', 0):g} (use fractional "
                         f"--scaling.cpus_per_worker, e.g. 0.5)")
