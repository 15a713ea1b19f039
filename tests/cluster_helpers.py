"""A real two-node Ray cluster (token auth on) and a real MLflow server, on loopback only.

Used by tests/test_cluster_e2e.py. Everything started here runs in its own process group
(`start_new_session=True`); `stop()` kills exactly those groups and any descendants that
left them, never anything else on the machine (no global `ray stop`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    """ppid -> [pid] for every process on the machine (read from /proc)."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_trees(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM the process groups we started, then SIGKILL them and every straggler.

    Each process was started with `start_new_session=True`, so its group holds it and the
    processes it spawned; descendants that left the group are found through /proc.
    """
    pids: set[int] = set()
    for proc in procs:
        pids |= {proc.pid} | descendants(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        pids |= {d for p in list(pids) if _alive(p) for d in descendants(p)}
        time.sleep(0.2)
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:  # descendants that moved to another process group
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


class RayCluster:
    """`ray start --head` plus `ray start --address=...` workers, each with --block."""

    def __init__(self, num_cpus_per_node: int = 2, object_store_mb: int = 300):
        # Short, so the unix socket paths under it stay below ~107 characters. One per node:
        # nodes that share a temp dir share `runtime_resources/`, and one node's runtime-env
        # agent then deletes the job's working_dir (the driver's cwd) under the other.
        self.temp_dir = tempfile.mkdtemp(prefix="/tmp/tlr")
        self.temp_dirs = [self.temp_dir]
        self.token = secrets.token_hex(32)
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.num_cpus = num_cpus_per_node
        self.object_store_bytes = object_store_mb * 1024 * 1024
        self.procs: list[subprocess.Popen] = []
        self.env = {
            **os.environ,
            # The job entrypoint's `python` is looked up on the PATH of `ray start`.
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            # Our own token, never ~/.ray/auth_token (RAY_AUTH_TOKEN wins over the file).
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            # Every Ray process of this cluster (raylets pass their environment on) finds it
            # here, not by scanning the machine: other Ray clusters run beside this one, and
            # e.g. Train's placement-group cleaner would otherwise fail with "Found multiple
            # active Ray instances" (or, with a single other one, query the wrong cluster).
            "RAY_ADDRESS": f"127.0.0.1:{self.gcs_port}",
        }

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(Path(self.temp_dir) / log_name, "wb")  # noqa: SIM115 - the child owns it
        common = ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}",
                  "--num-gpus=0", f"--object-store-memory={self.object_store_bytes}",
                  f"--dashboard-agent-listen-port={free_port()}",
                  f"--metrics-export-port={free_port()}", "--disable-usage-stats"]
        proc = subprocess.Popen([str(VENV_BIN / "ray"), "start", *args, *common],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=self.temp_dir)
        self.procs.append(proc)
        return proc

    def start_head(self) -> None:
        self._start(["--head", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}",
                     "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}",
                     f"--ray-client-server-port={free_port()}"], "head.log")
        wait_for(lambda: len(self.alive_node_ids()) == 1, 120, "the Ray head", 1.0)

    def add_node(self) -> None:
        expected = len(self.procs) + 1
        temp_dir = tempfile.mkdtemp(prefix="/tmp/tlr")
        self.temp_dirs.append(temp_dir)
        self._start([f"--address={self.address}", f"--temp-dir={temp_dir}"],
                    f"node{len(self.procs)}.log")
        wait_for(lambda: len(self.alive_node_ids()) == expected, 120, "the new Ray node", 1.0)

    # ---- the dashboard's HTTP API, with the cluster's token ----
    def api(self, path: str, method: str = "GET", body: dict | None = None,
            timeout_s: float = 15.0):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.dashboard_url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310
            return json.loads(resp.read() or b"null")

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"`{' '.join(proc.args[:3])}` exited with {proc.returncode}; "
                                   f"see {self.temp_dir}/*.log:\n{self.logs_tail()}")

    def logs_tail(self, n: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}"
                         for p in sorted(Path(self.temp_dir).glob("*.log")))

    def alive_node_ids(self) -> list[str]:
        self.check_alive()
        try:
            reply = self.api("/api/v0/nodes?detail=false&limit=100", timeout_s=5)
        except (urllib.error.URLError, OSError, ValueError):
            return []
        rows = reply["data"]["result"]["result"]
        return sorted(r["node_id"] for r in rows if r["state"] == "ALIVE")

    def job(self, submission_id: str) -> dict:
        return self.api(f"/api/jobs/{submission_id}")

    def job_logs(self, submission_id: str) -> str:
        try:
            return self.api(f"/api/jobs/{submission_id}/logs")["logs"]
        except Exception as e:  # noqa: BLE001 - debugging output only
            return f"(no logs: {e})"

    def stop_job(self, submission_id: str) -> None:
        try:
            self.api(f"/api/jobs/{submission_id}/stop", method="POST", body={})
        except Exception:  # noqa: BLE001 - best effort during teardown
            pass

    def stop(self) -> None:
        # GCS, monitor and `ray start --block` linger on SIGTERM: a short grace, then SIGKILL.
        kill_trees(self.procs, grace_s=3.0)
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


class MlflowServer:
    """`mlflow server` with a SQLite store, serving artifacts itself; restartable in place."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120) -> float:
        """Starts the server and waits until it answers /health; returns the seconds taken."""
        t0 = time.monotonic()
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # No GenAI job runner: it forks ~7 huey consumers that cost a minute of CPU here.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts"),
             "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=self.root)

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):  # noqa: S310
                    return True
            except (urllib.error.URLError, OSError):
                return False

        wait_for(healthy, timeout_s, f"the MLflow server on {self.url}")
        return time.monotonic() - t0

    def log_tail(self, n: int = 3000) -> str:
        return "\n".join(p.read_text(errors="replace")[-n:]
                         for p in sorted(self.root.glob("server-*.log")))

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is not None:
            kill_trees([self.proc], grace_s)
            self.proc = None
