"""Where MLflow keeps runs: the tracking URI, each experiment's artifact folder, the command
that shows them, and a check that a tracking server answers before any training starts.

Everything resolves to absolute locations under `paths.home()` unless `MLFLOW_TRACKING_URI`
says otherwise, because a job started with `ray job submit` runs in a temporary copy of the
working directory and MLflow's defaults (`./mlflow.db`, `./mlruns`) would vanish with it.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from urllib.parse import urlparse

import mlflow

from tlray import paths
from tlray.errors import TlrayError

_SERVER_SCHEMES = ("http", "https", "databricks")


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else an absolute SQLite store under `paths.home()`.

    SQLite (not a file store) because the model registry needs a database store.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    paths.home().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{paths.home() / 'mlflow.db'}"


def configure() -> str:
    """Point MLflow's fluent API at `tracking_uri()` and return it.

    Opening a run and every registry call go through this first, so a changed `TLRAY_HOME`
    or `MLFLOW_TRACKING_URI` takes effect without restarting the process.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def _is_server(uri: str) -> bool:
    return urlparse(uri).scheme.lower() in _SERVER_SCHEMES


def default_artifact_location(experiment: str) -> str | None:
    """Absolute artifact folder for a new experiment; None lets a tracking server decide.

    A server's `--default-artifact-root` / `--serve-artifacts` is the only place every node of
    a cluster can reach, so it is left alone. Otherwise `<home>/mlartifacts/<experiment>`,
    with the name made safe as a single folder name.
    """
    if _is_server(tracking_uri()):
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return str(paths.home() / "mlartifacts" / folder)


def ui_command() -> str:
    """The command (or URL) a person uses to look at the runs this process logs."""
    uri = tracking_uri()
    if _is_server(uri):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def check_tracking_server(uri: str | None = None, timeout_s: float = 3.0) -> None:
    """Fail in seconds, before any training, when an http(s) tracking server is unreachable.

    Local stores (SQLite, files) need no check. Any HTTP answer below 500 counts as
    reachable: the point is to catch a wrong host/port or a server that is down, not to
    second-guess authentication.
    """
    uri = uri or tracking_uri()
    if urlparse(uri).scheme.lower() not in ("http", "https"):
        return
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s):  # noqa: S310 (http(s) only)
            return
    except urllib.error.HTTPError as err:
        if err.code < 500:
            return
        problem = f"answered HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        problem = f"is unreachable ({reason})"
    raise TlrayError(
        f"MLflow tracking server {uri} {problem} within {timeout_s:g} s. Start it "
        "(`mlflow server --host 0.0.0.0 --port 5000`) or set MLFLOW_TRACKING_URI to a reachable "
        "server, or unset it to use the local SQLite store."
    )
