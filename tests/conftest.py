"""Shared fixtures: a real local Ray cluster, and a private TLRAY_HOME per test."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import sys
from pathlib import Path

import pytest

# Quiet, offline and deterministic where it matters; set before Ray or timm import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# The session's Ray cluster (`ray_cluster`) keeps token authentication on; Ray reads the mode
# when it is imported, so this process (and every driver a test starts) knows it from here.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

FEW_DIGITS = 1250  # of the built-in 5,000: 1,000 to train, 125 to validate, 125 to test


def pytest_collection_modifyitems(items):
    """A test on the session's Ray cluster is a `ray` test, marked or not: `-m "not ray"`
    then runs exactly the tests that start no Ray."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _sys_path_restored():
    """Loading a logged model puts its shipped code (a partial copy of tlray) first on
    sys.path and leaves it there; a process spawned later would import that copy. Taken
    off after every test, also where a module's fixture loaded the model before the test's
    own fixtures started (seen: test_recipes' spawned lock holders after test_serving)."""
    yield
    sys.path[:] = [p for p in sys.path if not (Path(p).parent / "MLmodel").is_file()]


@pytest.fixture(autouse=True)
def _ray_only_in_ray_tests(request):
    """A test that is not a `ray` test starts no Ray: it would start a local cluster of
    its own (seconds), and a `ray_cluster` test after it would find this process on that one
    instead of the session's."""
    import ray

    before = ray.is_initialized()  # connected to the session's cluster by an earlier test
    yield
    if request.node.get_closest_marker("ray") is None:
        assert before or not ray.is_initialized(), (
            "this test started Ray: give it the ray_cluster fixture (or mark it `ray`)")


@pytest.fixture(autouse=True)
def _sigint_handler_restored():
    """Ray Train's `fit()`, run on the main thread, installs a SIGINT handler that holds its
    controller actor and never puts the old one back: the actor then lives on until some later
    test replaces the handler. Three times, a controller 12 minutes old died that way in the middle
    of a later test's sweep, and this process's Ray driver no longer heard that new actors had
    started (their trials waited forever). Restoring the handler ends it in its own test."""
    saved = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, saved)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real Ray cluster for the whole session: `ray start --head` in a process group of
    its own (see cluster_helpers.RayCluster), joined by this process.

    Every process of it, this one and every driver a test starts find it by RAY_ADDRESS, never
    by looking for Ray clusters on the machine: other clusters may run beside it (a test's own
    two-raylet cluster, another checkout's tests), and Ray Train's placement-group cleaner,
    which asks the state API whether its controller lives, would otherwise ask another one
    and remove a running run's placement group.

    4 logical CPUs on a 2-core machine: Train workers, Tune drivers and Ray Data tasks ask
    for fractions of them, and the over-subscription only costs a little speed.
    """
    import ray

    from cluster_helpers import RayCluster
    from tlray.serve.log_model import import_evaluators
    from tlray.train.cluster import init_ray

    cluster = RayCluster(num_cpus_per_node=4, object_store_mb=1024,
                         token=os.environ["RAY_AUTH_TOKEN"])
    try:
        cluster.start_head()
        os.environ["RAY_ADDRESS"] = cluster.address
        import_evaluators()  # as a driver does (`plan.preflight`), before Ray's threads start
        ray.shutdown()  # a local cluster an earlier test may have started (`init_ray`)
        init_ray()
        yield ray
    finally:
        ray.shutdown()
        cluster.stop()
        os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow database: creating one costs seconds (68 migrations),
    copying it milliseconds."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in digits, prepared once per test session (as `tlray prepare builtin:mnist`
    would, into a home's datasets/); every `tlray_home` starts with a copy."""
    from tlray.data.prepare import prepare

    home = tmp_path_factory.mktemp("digits-home")
    return Path(prepare("builtin:mnist", home / "datasets" / "mnist-builtin",
                        progress=False).uri)


@pytest.fixture(scope="session")
def prepared_few_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FEW_DIGITS of the built-in digits, drawn at random and prepared once per session.

    Most Ray tests need real digits and real epochs, not many of them: on the 4,000 digits
    of the whole train split, the sweep that retries a dead trial took 44 s, on these 27 s.
    Tests that judge accuracy (a linear probe, a served champion) keep the whole split."""
    import numpy as np

    from tlray.data.pixel_sources import builtin_mnist_arrays, from_arrays
    from tlray.data.prepare import prepare

    images, labels = builtin_mnist_arrays()
    pick = np.sort(np.random.default_rng(0).permutation(len(labels))[:FEW_DIGITS])
    home = tmp_path_factory.mktemp("few-digits-home")
    return Path(prepare(from_arrays(images[pick], labels[pick], uri="few-digits"),
                        home / "datasets" / "few-digits", progress=False).uri)


@pytest.fixture
def tlray_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, migrated_db: Path,
               prepared_digits: Path) -> Path:
    """A private TLRAY_HOME for one test: its own MLflow store (a copy of a migrated one), the
    built-in digits already prepared (`prepare("builtin:mnist")` finds them up to date), and
    MLFLOW_TRACKING_URI unset (restored afterwards)."""
    import mlflow

    from tlray.track.store import configure

    home = tmp_path / "tlray-home"
    (home / "datasets").mkdir(parents=True)
    shutil.copy(migrated_db, home / "mlflow.db")
    shutil.copytree(prepared_digits, home / "datasets" / prepared_digits.name)
    monkeypatch.setenv("TLRAY_HOME", str(home))
    # setenv first so monkeypatch restores the variable that mlflow.set_tracking_uri exports.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset-by-test")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # MLflow keeps the last tracking URI in a global: point it at this test's store, so
    # clients created before any tlray call agree.
    configure()
    yield home
    while mlflow.active_run() is not None:  # a failed test must not leak its run
        mlflow.end_run()


@pytest.fixture
def mnist(tlray_home: Path):
    """The built-in digits in this test's home (prepared once per session)."""
    from tlray.data.dataset import load_info

    return load_info(tlray_home / "datasets" / "mnist-builtin")


@pytest.fixture
def few_digits(tlray_home: Path, prepared_few_digits: Path):
    """FEW_DIGITS of the built-in digits in this test's home (prepared once per session)."""
    from tlray.data.dataset import load_info

    dest = tlray_home / "datasets" / prepared_few_digits.name
    shutil.copytree(prepared_few_digits, dest)
    return load_info(dest)
