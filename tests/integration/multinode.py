"""Module-scoped fixtures for a local multi-node Ray cluster with object storage and an MLflow server.

What they start, all on 127.0.0.1 and all gone at teardown:

* ``s3_server``: moto's S3-compatible server, in this process, with one bucket;
* ``mlflow_server``: a real ``mlflow server`` (SQLite backend) in its own process group;
* ``multinode_cluster``: a CPU-less head (``ray start --head --block --num-cpus 0``) and two worker
  nodes of one CPU each, so jobs run their driver on the head and their tasks on the workers, as on
  a real cluster. Each worker node has its own ``FORGETTING_RAY_CACHE`` folder, which is what a
  node-local cache looks like when every node sits on the same disk.

Every node gets its own ports (agent, metrics, runtime-env agent, node manager, object manager,
worker range) and its own temp dir, and the worker nodes are started one after the other, each
waited for until the head lists it: two worker nodes started at once with default ports fight over
them and time out registering. Nodes are stopped by ending their ``ray start --block`` process group,
never with ``ray stop``, which would stop every Ray cluster on the machine.

Use them from a module of this package with ``pytest_plugins = [f"{__package__}.multinode"]``
(pytest puts tests/ on sys.path and imports this package as ``integration``, so that name, unlike
``tests.integration``, resolves however pytest is started), or import the fixtures by name. Nothing
here calls ``ray.init`` in the pytest process: other tests of the session may be connected to
another cluster.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest

from conftest import FAST_TRAIN_POLL

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WORKER_NODES = 2
# Below Linux's ephemeral range (32768+), where outgoing connections would take ports out of a worker
# range, and above Ray's default worker ports (10002-19999), which other local clusters use.
_WORKER_PORT_SPAN = (20000, 32000)


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _free_port_range(n: int, avoid: set[int]) -> range:
    """``n`` consecutive ports that are free now and not in ``avoid``."""
    for _ in range(200):
        base = random.randrange(_WORKER_PORT_SPAN[0], _WORKER_PORT_SPAN[1] - n)
        ports = range(base, base + n)
        if avoid.isdisjoint(ports) and all(_bindable(p) for p in ports):
            return ports
    raise RuntimeError(f"no {n} consecutive free ports in {_WORKER_PORT_SPAN}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true", TOKENIZERS_PARALLELISM="false",
               **FAST_TRAIN_POLL)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
    env.pop("RAY_ADDRESS", None)
    return env


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # its own process group, so stopping it takes every process it started along; output to a file,
    # since an unread pipe fills up and blocks a chatty server
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen, grace_s: float = 60) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` tears its node's processes down with it
    except ProcessLookupError:  # a test already killed this node
        proc.wait()
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str, timeout_s: float,
                may_retry: bool = False) -> bool:
    """True once ``ready()``; if ``proc`` exits or time runs out: False when ``may_retry``, else the test fails."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            if may_retry:
                return False
            state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not up after {timeout_s:.0f} s"
            pytest.fail(f"{what} {state}:\n{log.read_text()[-6000:]}")
        time.sleep(0.25)
    return True


def _started(log: Path) -> bool:
    # what `ray start` prints once Ray has seen its node registered with the GCS
    return "Ray runtime started." in log.read_text()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):  # noqa: S310
            return True
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str]

    def list(self, prefix: str = "") -> list[str]:
        """Keys of the bucket's objects under ``prefix``."""
        pages = self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self._client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def delete(self, prefix: str) -> None:
        """Remove every object under ``prefix``."""
        for key in self.list(prefix):
            self._client().delete_object(Bucket=self.bucket, Key=key)

    def _client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    (port,) = _free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # pyarrow and boto3 both read AWS_ENDPOINT_URL; no metadata lookups, which hang off EC2
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    s3 = S3Server(endpoint=endpoint, bucket="forgetting-ray-test", env=env)
    try:
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=s3.bucket)
        yield s3
    finally:
        server.stop()


@contextmanager
def serve_mlflow(store: str, artifacts: Path, log: Path, port: int | None = None) -> Iterator[str]:
    """``mlflow server`` on the backend store ``store`` (e.g. a run's ``sqlite:///…/mlflow.db``); yields its URL.
    ``port``: the one a server that was stopped had, to bring it back where its clients look."""
    (port,) = [port] if port else _free_ports(1)
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", store, "--default-artifact-root", str(artifacts)]
    proc = _start(cmd, _env(), log)
    uri = f"http://127.0.0.1:{port}"
    try:
        # its imports take 20-40 s on an idle machine, minutes on a busy 2-core one
        _wait_until(lambda: _answers(f"{uri}/health"), proc, log, "mlflow server", timeout_s=300)
        yield uri
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def mlflow_server() -> Iterator[str]:
    """The tracking URI of a fresh MLflow server."""
    root = Path(tempfile.mkdtemp(prefix="frm-mlflow", dir="/tmp"))
    try:
        with serve_mlflow(f"sqlite:///{root}/mlflow.db", root / "artifacts", root / "mlflow.log") as uri:
            yield uri
    finally:
        shutil.rmtree(root, ignore_errors=True)


CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                    reason="headless Chromium not installed (apt-get install -y chromium)")


def render(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Load ``url`` in headless Chromium, letting the React app fetch and render for a while (``--dump-dom``
    prints the page, ``--screenshot=FILE`` saves it)."""
    assert CHROMIUM, "headless Chromium is required here: apt-get install -y chromium"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
           "--disable-background-networking", "--disable-component-update", f"--user-data-dir={profile}",
           "--window-size=1600,1000", "--virtual-time-budget=30000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "HOME": str(profile)},
                          check=False)


# a subprocess, so that the pytest process never joins this cluster
_NODES_PY = """
import json, sys
from ray.util.state import list_nodes
nodes = list_nodes(address=sys.argv[1], detail=True, raise_on_missing_output=False)
print(json.dumps({n.node_id: {"cpus": n.resources_total.get("CPU", 0), "alive": n.state == "ALIVE"} for n in nodes}))
"""


# what Ray's job server answers while the head's dashboard agent cannot take a job yet
NO_AGENT = "No available agent to submit job"


@dataclass
class MultinodeCluster:
    address: str  # the dashboard, for `ray job submit --address`
    gcs_address: str
    head_cache: Path
    worker_caches: list[Path]
    worker_pids: list[subprocess.Popen] = field(default_factory=list)  # `ray start --block` of each worker node
    head_node_id: str = ""
    worker_node_ids: list[str] = field(default_factory=list)  # in the order of worker_pids
    # a folder the head (and this test) see and the last worker node does not: it runs in a mount namespace of
    # its own with an empty tmpfs there, as a machine without the head's local disk would
    head_only: Path | None = None

    def node_ids(self) -> dict[str, dict]:
        """Every node the cluster knows, dead ones included: ``{node_id_hex: {"cpus": float, "alive": bool}}``."""
        out = subprocess.run([sys.executable, "-c", _NODES_PY, self.address], env=_env(), capture_output=True,
                             text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(f"listing the nodes of {self.address} failed:\n{out.stderr[-4000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def alive(self) -> set[str]:
        return {n for n, info in self.node_ids().items() if info["alive"]}

    def submit(self, entrypoint_args: list[str], env_vars: dict[str, str] | None = None,
               timeout_s: float = 600) -> tuple[str, str]:
        """Run ``entrypoint_args`` as a Ray job with the repository as working dir; ``(status, job logs)``.

        A job still running after ``timeout_s`` is stopped, so its status then reads STOPPED.
        """
        return self.wait(self.start(entrypoint_args, env_vars), timeout_s)

    def start(self, entrypoint_args: list[str], env_vars: dict[str, str] | None = None) -> str:
        """Submit with the Ray CLI, as a user does, and return the job id without waiting for the job."""
        job_id = f"test-{uuid.uuid4().hex[:12]}"
        runtime_env = {"env_vars": env_vars or {}, "excludes": [".git", ".venv", "runs", ".cache"]}
        cmd = [str(BIN / "ray"), "job", "submit", "--no-wait", "--address", self.address, "--submission-id", job_id,
               "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint_args]
        # A head whose dashboard agent is still starting (or busy) answers 500 "No available agent to submit job,
        # please try again later"; the job never got in, so the same submission id is tried again, as Ray asks.
        deadline = time.monotonic() + 180
        while True:
            out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
            if not (out.returncode and NO_AGENT in out.stdout + out.stderr and time.monotonic() < deadline):
                break
            time.sleep(3)
        if out.returncode:  # the CLI never got the job in, e.g. a bad runtime env
            pytest.fail(f"ray job submit failed:\n{(out.stdout + out.stderr)[-6000:]}")
        return job_id

    def wait(self, job_id: str, timeout_s: float) -> tuple[str, str]:
        """``(status, logs)`` once the job has ended; a job still running after ``timeout_s`` is stopped first."""
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.address)
        deadline = time.monotonic() + timeout_s
        while not client.get_job_status(job_id).is_terminal():
            if time.monotonic() > deadline:
                client.stop_job(job_id)
                deadline = float("inf")
            time.sleep(0.5)
        return str(client.get_job_status(job_id)), client.get_job_logs(job_id)

    def node_of(self, actor_class: str) -> str:
        """The node id of the (first) alive actor of class ``actor_class``, e.g. ``RayTrainWorker``."""
        out = subprocess.run([sys.executable, "-c", _ACTOR_NODE_PY, self.address, actor_class], env=_env(),
                             capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(f"finding a {actor_class} actor failed:\n{out.stderr[-4000:]}")
        return out.stdout.strip().splitlines()[-1]

    def kill_node(self, node_id: str) -> None:
        """SIGKILL the worker node ``node_id`` (its raylet and everything it started): a lost machine."""
        proc = self.worker_pids[self.worker_node_ids.index(node_id)]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


_ACTOR_NODE_PY = """
import sys
from ray.util.state import list_actors
actors = list_actors(address=sys.argv[1], filters=[("class_name", "=", sys.argv[2]), ("state", "=", "ALIVE")],
                     raise_on_missing_output=False)
print(actors[0].node_id if actors else "")
"""


def _worker_node_cmd(gcs_address: str, temp_dir: Path, used: set[int]) -> list[str]:
    """`ray start` of a one-CPU worker node on ports of its own; its worker port range is added to ``used``."""
    agent_http, agent_grpc, metrics, rt_env, node_manager, object_manager = _free_ports(6)
    workers = _free_port_range(100, used)  # 20 ran out on a busy node (every worker process holds one)
    used |= set(workers)
    return [str(BIN / "ray"), "start", "--block", "--address", gcs_address, "--num-cpus", "1",
            "--node-ip-address", "127.0.0.1", "--dashboard-agent-listen-port", str(agent_http),
            "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
            "--runtime-env-agent-port", str(rt_env), "--node-manager-port", str(node_manager),
            "--object-manager-port", str(object_manager), "--min-worker-port", str(workers.start),
            "--max-worker-port", str(workers.stop - 1), "--temp-dir", str(temp_dir), "--disable-usage-stats"]


def head_node_cmd(temp_dir: Path) -> tuple[list[str], str, str]:
    """`ray start --head` of a CPU-less head on ports of its own: ``(cmd, dashboard URL, GCS address)``.

    Every port is named: the dashboard agent's default (52365) is held by whichever local cluster started first,
    and a head whose agent cannot bind it answers every submission "No available agent to submit job".
    """
    gcs, dash, client, agent_http, agent_grpc, metrics, rt_env = _free_ports(7)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "0", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(rt_env), "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    return cmd, f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}"


@pytest.fixture(scope="module")
def multinode_cluster(s3_server: S3Server) -> Iterator[MultinodeCluster]:
    root = Path(tempfile.mkdtemp(prefix="frm", dir="/tmp"))  # short: Ray's unix socket paths are length-limited
    head_cmd, dashboard, gcs_address = head_node_cmd(root / "h")
    cluster = MultinodeCluster(address=dashboard, gcs_address=gcs_address, head_cache=root / "head-cache",
                               worker_caches=[root / f"node{i}-cache" for i in range(WORKER_NODES)])
    cluster.head_only = root / "head-only"
    for folder in (cluster.head_cache, *cluster.worker_caches, cluster.head_only):
        folder.mkdir()
    base_env = {k: v for k, v in _env().items() if k != "MLFLOW_TRACKING_URI"}  # jobs pass their own
    base_env |= s3_server.env
    procs: list[subprocess.Popen] = []
    try:
        head_log = root / "head.log"
        # no drain on SIGTERM: a head's raylet never finishes draining, so stopping it would wait the full 30 s
        head_env = base_env | {"FORGETTING_RAY_CACHE": str(cluster.head_cache),
                               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        procs.append(_start(head_cmd, head_env, head_log))
        _wait_until(lambda: _started(head_log) and _answers(f"{cluster.address}/api/version"), procs[0], head_log,
                    "ray head", 120)
        (cluster.head_node_id,) = cluster.alive()

        used: set[int] = set()
        for i, cache in enumerate(cluster.worker_caches):
            log = root / f"node{i}.log"
            env = base_env | {"FORGETTING_RAY_CACHE": str(cache)}
            # a loaded machine can keep a raylet from registering within Ray's fixed 30 s, after which `ray start`
            # gives up: one more try, on fresh ports
            for may_retry in (True, False):
                temp_dir = Path(tempfile.mkdtemp(prefix=f"w{i}-", dir=root))
                cmd = _worker_node_cmd(cluster.gcs_address, temp_dir, used)
                if i == len(cluster.worker_caches) - 1:
                    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           f'mount -t tmpfs none "{cluster.head_only}" && exec "$@"', "sh", *cmd]
                procs.append(_start(cmd, env, log))
                # polled from its log, not with node_ids(): starting a Python per poll starves that raylet of CPU
                if _wait_until(lambda: _started(log), procs[-1], log, f"ray worker node {i}", 120, may_retry):
                    break
                _stop(procs.pop())
            cluster.worker_pids.append(procs[-1])
            (new,) = cluster.alive() - {cluster.head_node_id, *cluster.worker_node_ids}
            cluster.worker_node_ids.append(new)
        yield cluster
    finally:
        for proc in reversed(procs):  # worker nodes first: a head going first leaves them retrying to reach it
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)
