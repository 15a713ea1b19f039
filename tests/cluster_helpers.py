"""A real two-node Ray cluster (token auth on) and a real MLflow server, on loopback only.

Used by tests/test_cluster_e2e.py. Each server is started in a process group of its own
(`start_new_session=True`) and stopped by killing exactly that group, plus any descendant
that left it: never a global `ray stop`, never anything by name, so the other Ray clusters
on the machine are left alone. A small guard process in each group kills the group if the
test process dies without running its finalizers (e.g. SIGKILL).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

VENV_BIN = Path(sys.executable).parent

# Runs inside a started process group: once the test process is gone, kill the group.
_GUARD = ("import os, signal, sys, time\n"
          "while os.path.exists(f'/proc/{sys.argv[1]}'): time.sleep(1)\n"
          "os.killpg(0, signal.SIGKILL)\n")


def driver_env(ray_cluster, home, **extra: str) -> dict[str, str]:
    """The environment of a `tlray` command a test runs as its own driver process: the
    test's Ray cluster and tlray home, and no MLflow URI left over from the test process."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "TLRAY_HOME": str(home), **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def ctrl_c_as_in_a_terminal() -> None:
    """`preexec_fn` for a driver a test will Ctrl-C: SIGINT at its default, as for a command
    a terminal runs. A job a script starts in the background (`cmd &`) inherits SIGINT
    ignored, and Python keeps ignoring it: without this, a test suite run that way would
    wait for a driver that can never hear the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    """A port nobody listens on, below the kernel's ephemeral range and above Ray's worker
    ports (10002-19999).

    Port 0 would hand out an ephemeral port, which any outgoing connection may take between
    this check and the server's bind (seen: Ray's client server failed to start with
    "Address already in use"); below that range only an explicit bind can collide.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, max(20001, low))
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))  # free on every address, not just loopback
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and the ephemeral range")


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def _children() -> dict[int, list[int]]:
    """ppid -> [pid] for every process on the machine, from /proc."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(entry))
    return out


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _session(pid: int) -> int | None:
    """The session id of a live process (None when gone or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[3])


def start_group(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """Starts `cmd` as the leader of a new session and process group, with a guard in it.

    A shell starts the guard in the background, then execs `cmd` (which keeps its pid).
    """
    launcher = ('py=$1 guard=$2 pid=$3; shift 3; '
                '"$py" -c "$guard" "$pid" </dev/null >/dev/null 2>&1 & exec "$@"')
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["/bin/sh", "-c", launcher, "sh", sys.executable, _GUARD, str(os.getpid()), *cmd],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, **kwargs)


def kill_groups(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM the groups led by `procs`, then SIGKILL them and any straggler.

    Each leader also leads its own session; a descendant that left the group but not the
    session is killed by pid. Nothing outside these sessions is touched.
    """
    sessions = {proc.pid for proc in procs}
    pids: set[int] = set()
    for proc in procs:
        pids |= {proc.pid} | _descendants(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_session(p) in sessions for p in pids):
        pids |= {d for p in list(pids) if _session(p) in sessions for d in _descendants(p)}
        time.sleep(0.2)
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the guard too
        except ProcessLookupError:
            pass
    for pid in pids:
        if _session(pid) in sessions:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class RayCluster:
    """`ray start --head --block` plus `ray start --address=... --block` for each node."""

    def __init__(self, num_cpus_per_node: int = 2, object_store_mb: int = 300,
                 token: str | None = None):
        # Short paths: unix sockets under them must stay below ~107 characters. One temp
        # dir per node: nodes sharing one share `runtime_resources/`, and one node's
        # runtime-env agent then deletes the job's working_dir (the driver's cwd).
        self.temp_dirs = [tempfile.mkdtemp(prefix="/tmp/tlr")]
        self.token = token or secrets.token_hex(32)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.num_cpus = num_cpus_per_node
        self.object_store_bytes = object_store_mb * 1024 * 1024
        self.procs: list[subprocess.Popen] = []
        self.node_ids: list[str] = []  # of the live nodes, in the order of `procs`
        self.dead: list[subprocess.Popen] = []  # nodes killed on purpose
        self.env = {
            **os.environ,
            # A job entrypoint's `python` is looked up on the PATH of `ray start`.
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            # This cluster's own token; RAY_AUTH_TOKEN wins over ~/.ray/auth_token, which
            # is neither read nor written. Clients get it through the same variable.
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            # Every Ray process of this cluster (raylets pass their environment on) finds
            # the cluster here instead of scanning the machine: with other Ray clusters
            # beside it, e.g. Train's placement-group cleaner fails with "Found multiple
            # active Ray instances" (or, with one other, asks the wrong cluster).
            "RAY_ADDRESS": f"127.0.0.1:{self.gcs_port}",
        }

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, args: list[str]) -> None:
        temp_dir = tempfile.mkdtemp(prefix="/tmp/tlr") if self.procs else self.temp_dirs[0]
        if temp_dir not in self.temp_dirs:
            self.temp_dirs.append(temp_dir)
        cmd = [str(VENV_BIN / "ray"), "start", *args, "--block", f"--temp-dir={temp_dir}",
               "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
               f"--object-store-memory={self.object_store_bytes}",
               f"--dashboard-agent-listen-port={free_port()}",
               f"--metrics-export-port={free_port()}", "--disable-usage-stats"]
        self.procs.append(start_group(cmd, Path(temp_dir) / "ray-start.log", env=self.env,
                                      cwd=temp_dir))

    def start_head(self) -> None:
        self._start(["--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                     f"--ray-client-server-port={free_port()}"])
        wait_for(lambda: len(self.alive_node_ids()) == 1, 120, "the Ray head", 1.0)
        self.node_ids = self.alive_node_ids()

    def add_node(self) -> str:
        """Starts a node and waits until it is up; returns its node id."""
        before = set(self.alive_node_ids())
        self._start([f"--address={self.address}"])
        # Generous: on a loaded 2-core machine a raylet, and the dashboard that reports it,
        # can take minutes to come up.
        wait_for(lambda: len(self.alive_node_ids()) == len(self.procs), 300,
                 "the new Ray node", 1.0)
        (new,) = set(self.alive_node_ids()) - before
        self.node_ids.append(new)
        return new

    def drain(self, node_id: str, deadline_s: int) -> None:
        """What the autoscaler does on a spot notice: drain with reason preemption and a
        deadline. Nothing kills the node at the deadline: the caller does (`kill_node`)."""
        out = subprocess.run(
            [str(VENV_BIN / "ray"), "drain-node", f"--address={self.address}",
             f"--node-id={node_id}", "--reason=DRAIN_NODE_REASON_PREEMPTION",
             "--reason-message=spot instance reclaimed",
             f"--deadline-remaining-seconds={deadline_s}"],
            env=self.env, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"ray drain-node failed:\n{out.stdout}\n{out.stderr}")

    def kill_node(self, node_id: str) -> None:
        """SIGKILLs a node's whole process group (raylet, workers): a reclaimed machine."""
        proc = self.procs.pop(self.node_ids.index(node_id))
        self.node_ids.remove(node_id)
        kill_groups([proc], grace_s=0)
        self.dead.append(proc)

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                logs = "\n".join(Path(d, "ray-start.log").read_text(errors="replace")[-3000:]
                                 for d in self.temp_dirs)
                raise RuntimeError(f"`{' '.join(proc.args[:3])}` exited with "
                                   f"{proc.returncode}:\n{logs}")

    # ---- the dashboard's HTTP API (jobs, state), with the cluster's token ----
    def api(self, path: str, method: str = "GET", timeout_s: float = 15.0):
        req = urllib.request.Request(self.dashboard_url + path, method=method,
                                     data=b"{}" if method == "POST" else None,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310
            return json.loads(resp.read() or b"null")

    def recount_nodes_for_train(self) -> None:
        """Has Ray count the cluster's nodes for elastic Train runs now, instead of at its next
        20-s tick: a node just added or killed then counts at once.

        Ray Train asks Ray Data's AutoscalingCoordinator actor how many workers fit; the
        actor looks at the nodes every 20 s (a class constant, no setting). Until then a
        killed node's CPUs still count, and Train waits for a worker group of the old size
        (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S at a time) before it shrinks. This calls the
        actor's own tick, the method its timer calls: a test-only nudge of Ray's private API.
        """
        code = ("import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR', "
                "log_to_driver=False); ray.get(ray.get_actor('AutoscalingCoordinator', "
                "namespace='AutoscalingCoordinator')._tick.remote())")
        subprocess.run([sys.executable, "-c", code, self.address], env=self.env, check=True,
                       capture_output=True, timeout=120)

    def alive_node_ids(self) -> list[str]:
        self.check_alive()
        try:
            rows = self.api("/api/v0/nodes?limit=100", timeout_s=20)["data"]["result"]["result"]
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
            return []  # not up yet
        return sorted(r["node_id"] for r in rows if r["state"] == "ALIVE")

    def job_status(self, submission_id: str) -> dict:
        return self.api(f"/api/jobs/{submission_id}")

    def job_logs(self, submission_id: str) -> str:
        try:
            return self.api(f"/api/jobs/{submission_id}/logs")["logs"]
        except Exception as e:  # noqa: BLE001 - for debugging output only
            return f"(no job logs: {e})"

    def diagnose(self, frames: int = 8) -> str:
        """Why a job may be stuck, compact enough for a CI log's tail: the placement groups
        that are not placed, and, by py-spy, every thread of this cluster's Python processes
        (the job's driver, Tune and Train actors) that is running or inside tlray (every
        thread of the driver: import locks and the like are shared between them): its
        innermost `frames` frames, then up to as many of tlray's own further out.
        """
        lines = []
        try:
            groups = self.api("/api/v0/placement_groups?limit=100")["data"]["result"]["result"]
            lines += [f"placement group {g['placement_group_id'][:8]} {g['state']} "
                      f"{g.get('strategy')}" for g in groups if g["state"] != "CREATED"]
        except Exception as e:  # noqa: BLE001 - for debugging output only
            lines.append(f"(no placement groups: {e})")
        for pid in sorted(set().union(*(_descendants(p.pid) for p in self.procs))):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if not (cmd.startswith("ray::") or " jobs/" in cmd) or "IDLE" in cmd:
                continue
            dump = subprocess.run([str(VENV_BIN / "py-spy"), "dump", "--pid", str(pid)],
                                  capture_output=True, text=True, timeout=30).stdout
            for thread in dump.split("\nThread ")[1:]:
                head, *stack = [f.strip() for f in thread.splitlines() if f.strip()]
                ours = [f for f in stack if "tlray" in f or "jobs/" in f]
                if "(active)" in head or ours or " jobs/" in cmd:
                    lines.append(f"--- pid {pid} {cmd.strip()[:60]}: thread {head}")
                    lines += stack[:frames] + [f for f in ours if f not in stack[:frames]][:frames]
        return "\n".join(lines)

    def stop_job(self, submission_id: str) -> None:
        try:
            self.api(f"/api/jobs/{submission_id}/stop", method="POST")
        except Exception:  # noqa: BLE001 - best effort, the cluster is stopped next anyway
            pass

    def stop(self) -> None:
        # `ray start --block`, the GCS and the autoscaler monitor linger on SIGTERM.
        kill_groups(self.procs + self.dead, grace_s=3.0)
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

    def launch(self) -> None:
        """Starts the server in the background (same port, same store every time)."""
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # No GenAI job runner: it forks ~7 huey consumers that cost a minute of CPU here.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.proc = start_group(
            [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts"),
             "--workers", "1"],
            self.root / f"server-{self.starts}.log", env=env, cwd=self.root)

    def wait_ready(self, timeout_s: float = 120) -> None:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n"
                                   + (self.root / f"server-{self.starts}.log").read_text())
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):  # noqa: S310
                    return True
            except (urllib.error.URLError, OSError):
                return False

        wait_for(healthy, timeout_s, f"the MLflow server on {self.url}")

    def start(self) -> float:
        t0 = time.monotonic()
        self.launch()
        self.wait_ready()
        return time.monotonic() - t0

    def stop(self, grace_s: float = 5.0) -> None:
        if self.proc is not None:
            kill_groups([self.proc], grace_s)
            self.proc = None


class Outage:
    """What clients of a crashed MLflow server meet: its port answers every request with
    503, as a proxy in front of a dead server does, and the requests are recorded.

    Lets a test hold a server down until a given write has been attempted (and refused),
    which it can observe, instead of guessing how long the write takes to come. MLflow's
    client retries a 503 with back-off, so the refused write reaches the restarted server.
    """

    def __init__(self, port: int):
        self.requests: list[tuple[float, str, bytes]] = []  # (time, path, body)
        outage = self

        class Refuse(BaseHTTPRequestHandler):
            def _refuse(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outage.requests.append((time.time(), self.path, body))
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

            def log_message(self, *args) -> None:  # quiet
                pass

        def bind():
            try:
                return ThreadingHTTPServer(("127.0.0.1", port), Refuse)
            except OSError:  # the dead server's socket is still being torn down
                return None

        self.httpd = wait_for(bind, 30, f"port {port} to be free")
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def refused_metrics(self, key: str) -> list[dict]:
        """Metric `key` in the MLflow `log-batch` writes refused so far (with their run_id)."""
        found = []
        for _, path, body in list(self.requests):
            if path.endswith("/runs/log-batch") and body:
                batch = json.loads(body)
                found += [{"run_id": batch.get("run_id"), "key": key,
                           "value": float(m["value"]), "timestamp": int(m["timestamp"]),
                           "step": int(m.get("step", 0))}  # proto JSON may quote int64s
                          for m in batch.get("metrics", []) if m["key"] == key]
        return found

    def end(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
