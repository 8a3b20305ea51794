"""Starting or joining Ray, with the environment every worker of the pipeline needs."""

from __future__ import annotations

import logging
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .console import quiet, route_ray_logs
from .errors import UserError
from .store import StorageNotWritable, atomic_write_text, is_uri, join_storage, probe_storage, run_root


class RunDirError(UserError, OSError):
    """``run_dir`` cannot hold the run: an unreachable bucket, or a local folder other nodes do not see."""


class PlacementTimeout(UserError, RuntimeError):
    """Workers, actors or trials that Ray did not place within ``resources.placement_timeout_s``."""

# Passed to every Ray worker: DeepSpeed must pick the CPU accelerator without guessing on CPU
# boxes, its JIT ops must land in one shared cache, nothing may reach for a model hub, and a bucket
# behind an S3-compatible endpoint is reached the same way from every node.  Not passed: the node-local
# cache (FORGETTING_RAY_CACHE is each node's own), MLflow (only the driver writes to it) and credentials
# (each node has its own, e.g. an instance role; a job's runtime env can add them).
WORKER_ENV_VARS = (
    "DS_ACCELERATOR",
    "TORCH_EXTENSIONS_DIR",
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "TOKENIZERS_PARALLELISM",
    "PYTHONPATH",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def worker_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in WORKER_ENV_VARS if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def init_ray(address: str | None = None, *, num_cpus: int | None = None, **kwargs: Any):
    """Join ``address`` (or $RAY_ADDRESS), else start a local cluster bound to 127.0.0.1.

    Idempotent: returns at once when this process is already connected.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": worker_env()}
    kwargs.setdefault("log_to_driver", not quiet())  # quiet CLI runs: workers' output stays in Ray's logs
    route_ray_logs()  # before init too: Ray logs its own start
    if address:
        ray.init(address=address, runtime_env=runtime_env, **kwargs)
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=kwargs.pop("include_dashboard", True),
            dashboard_host="127.0.0.1",
            runtime_env=runtime_env,
            **kwargs,
        )
    route_ray_logs()
    return ray


def default_storage_path(run_dir: str | Path) -> str:
    return join_storage(run_dir, "ray_storage")


# Ray Data's repartition tasks (scoring and evaluation) each take a whole CPU, on one node: an actor pool
# must leave that much free on at least one node, or the stage waits forever (STACK_NOTES Exp 3, §7).
RAY_DATA_TASK_CPUS = 1.0


def alive_node_cpus(ray) -> list[float]:
    """CPUs of each alive node (a head started with --num-cpus 0 counts as 0)."""
    return [float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n["Alive"]]


def spread_actors(node_cpus: list[float], count: int, cpus_each: float) -> list[float] | None:
    """CPUs left on each node after placing ``count`` actors of ``cpus_each`` CPUs, each on the node with the
    most CPUs left -- how Ray spreads once nodes are half used, and the worst case for fragmentation.
    None when an actor finds no node with room."""
    free = list(node_cpus)
    for _ in range(count):
        if not free:
            return None
        i = max(range(len(free)), key=free.__getitem__)
        if free[i] + 1e-9 < cpus_each:
            return None
        free[i] -= cpus_each
    return free


def starves_ray_data(pool: Any, node_cpus: list[float], task_cpus: float = RAY_DATA_TASK_CPUS) -> bool:
    """True when a CPU actor pool cannot be placed, or leaves no node with ``task_cpus`` free for Ray Data."""
    if pool.num_gpus_per_actor:
        return False  # GPU actors are placed by their GPUs; their nodes keep CPUs for Ray Data
    free = spread_actors(node_cpus, pool.concurrency, pool.num_cpus_per_actor)
    return free is None or max(free, default=0.0) + 1e-9 < task_cpus


def largest_fitting_concurrency(pool: Any, node_cpus: list[float], task_cpus: float = RAY_DATA_TASK_CPUS) -> int:
    n = pool.concurrency
    while n > 0 and starves_ray_data(pool.model_copy(update={"concurrency": n}), node_cpus, task_cpus):
        n -= 1
    return n


POOL_NAMES = {"scoring": "scoring actors", "eval": "evaluation actors"}


def describe_pool_problem(section: str, pool: Any, node_cpus: list[float]) -> str:
    need = pool.concurrency * pool.num_cpus_per_actor
    fits = largest_fitting_concurrency(pool, node_cpus)
    nodes = ", ".join(f"{c:g}" for c in node_cpus)
    return (f"{POOL_NAMES.get(section, section)} take {need:g} of {sum(node_cpus):g} CPUs "
            f"({section}.concurrency={pool.concurrency} x {section}.num_cpus_per_actor={pool.num_cpus_per_actor:g} "
            f"on nodes with {nodes} CPUs), leaving no node a whole CPU for Ray Data's tasks, and the stage would "
            f"wait forever: " + (f"set {section}.concurrency={fits}" if fits else "add a node with a free CPU")
            + f" or lower {section}.num_cpus_per_actor")


def check_actor_pool_cpus(ray, section: str, pool: Any, *, ray_address: str | None, error: type[Exception]) -> None:
    """Refuse an actor pool (``pool``: a config section with concurrency / num_cpus_per_actor /
    num_gpus_per_actor) that cannot be placed, or that leaves no node a whole CPU for Ray Data's own tasks:
    resources are per node, and the stage would wait forever without an error.

    On a cluster joined by address an autoscaler may still add nodes, so there it only warns.
    """
    nodes = alive_node_cpus(ray)
    if not starves_ray_data(pool, nodes):
        return
    refuse_or_warn(describe_pool_problem(section, pool, nodes), ray_address, error)


def describe_nodes(ray) -> str:
    """Every alive node's CPUs and GPUs, for an error saying where nothing fitted."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    return ", ".join(f"{n['NodeManagerAddress']}:{n['NodeID'][:8]} {n['Resources'].get('CPU', 0):g} CPU "
                     f"{n['Resources'].get('GPU', 0):g} GPU" for n in nodes) or "no alive node"


def check_worker_group(ray, res: Any, *, error: type[Exception], held_cpus: float = 0.0) -> None:
    """Refuse a Ray Train worker group that the alive nodes cannot hold, counted per node (each worker is one
    bundle of resources.cpus_per_worker CPUs, and a GPU on GPU): it would wait forever.  ``held_cpus``: what the
    calling process already holds on one node (a Tune trial).  Joined by address: only a warning (an autoscaler
    may add nodes; resources.placement_timeout_s bounds that wait)."""
    cpus = sorted(alive_node_cpus(ray), reverse=True)
    if cpus:
        cpus[0] = max(0.0, cpus[0] - held_cpus)
    fits = spread_actors(cpus, res.num_workers, res.cpus_per_worker) is not None
    if res.use_gpu:
        gpus = sum(int(n["Resources"].get("GPU", 0.0)) for n in ray.nodes() if n["Alive"])
        fits = fits and gpus >= res.num_workers
    if fits:
        return
    problem = (f"training needs resources.num_workers={res.num_workers} workers of resources.cpus_per_worker="
               f"{res.cpus_per_worker:g} CPU{' and 1 GPU' if res.use_gpu else ''} each, each on one node"
               + (f" (beside the {held_cpus:g} CPU its trial holds)" if held_cpus else "")
               + f"; the cluster has {describe_nodes(ray)}: lower resources.num_workers or "
               "resources.cpus_per_worker, or add nodes")
    refuse_or_warn(problem, res.ray_address, error)


def refuse_or_warn(problem: str, ray_address: str | None, error: type[Exception]) -> None:
    """A demand no alive node can hold: an error on a cluster this run started; joined by address, a warning
    (an autoscaler may add nodes, and resources.placement_timeout_s bounds the wait)."""
    if ray_address is None:
        raise error(problem)
    logging.getLogger(__name__).warning("%s (continuing: an autoscaler may add nodes)", problem)


def placement_timeout_error(what: str, setting: str, timeout_s: float, ray) -> PlacementTimeout:
    """The one error for a demand still pending after ``resources.placement_timeout_s``."""
    return PlacementTimeout(
        f"{what} not placed within resources.placement_timeout_s={timeout_s:g} s; the cluster has "
        f"{describe_nodes(ray)}. Lower {setting}, add nodes (or let the autoscaler finish: `ray status` shows "
        "pending nodes), or raise resources.placement_timeout_s")


@contextmanager
def bounded_actor_start(section: str, pool: Any, timeout_s: float) -> Iterator[None]:
    """Ray Data waits for an actor pool's actors forever by default: wait at most ``timeout_s`` for all of them
    to be placed and constructed (their models loaded), then stop with what was pending."""
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.wait_for_min_actors_s
    ctx.wait_for_min_actors_s = max(1, math.ceil(timeout_s))
    try:
        yield
    except ray.exceptions.GetTimeoutError as e:
        if "starting actors" not in str(e):
            raise
        gpus = f" and {pool.num_gpus_per_actor:g} GPU" if pool.num_gpus_per_actor else ""
        raise placement_timeout_error(
            f"{POOL_NAMES.get(section, section)} ({section}.concurrency={pool.concurrency} of "
            f"{pool.num_cpus_per_actor:g} CPU{gpus} each)",
            f"{section}.concurrency or {section}.num_cpus_per_actor", timeout_s, ray) from None
    finally:
        ctx.wait_for_min_actors_s = saved


@contextmanager
def ray_data_bars_off() -> Iterator[None]:
    """Ray Data draws a bar per operator and prints its plan: off, so a stage shows one bar of its own on the
    driver.  Set before the Dataset is built (it copies the context)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.print_on_execution_start)
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = ctx.print_on_execution_start = False
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.print_on_execution_start = saved


class _StepRelay:
    """A mailbox actor: rank 0 puts each optimizer step's metrics, the driver takes them."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def put(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def take(self) -> list[dict[str, Any]]:
        rows, self.rows = self.rows, []
        return rows


@contextmanager
def step_relay(on_step: Callable[[dict[str, Any]], None] | None, poll_s: float = 1.0) -> Iterator[str | None]:
    """While a fit runs, hand every step's metrics to ``on_step`` in this (the driver) process, as they come:
    the MLflow server need only be reachable from the driver, and a long run shows its curves live.

    Yields the name of a relay actor for rank 0 to send to (None, and no actor, without ``on_step``); a
    failing ``on_step`` (MLflow down) is logged once and never stops the fit."""
    if on_step is None:
        yield None
        return
    import threading
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = f"forgetting-ray-steps-{uuid.uuid4().hex[:12]}"
    # on the driver's node: a worker node lost mid-fit must not take the relay with it
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    relay = ray.remote(num_cpus=0)(_StepRelay).options(name=name, scheduling_strategy=here).remote()
    stop, problems = threading.Event(), []

    def warn_once(what: str, e: Exception) -> None:
        if not problems:
            logging.getLogger(__name__).warning("live step metrics: %s (%s); the rest are logged after the fit", what, e)
        problems.append(e)

    def drain() -> None:
        if problems and isinstance(problems[0], ray.exceptions.RayActorError):
            return  # the relay is gone: the steps come back with the fit's result instead
        try:
            rows = ray.get(relay.take.remote())
        except ray.exceptions.RayActorError as e:
            warn_once("the relay actor died", e)
            return
        for row in rows:
            try:
                on_step(row)
            except Exception as e:  # noqa: BLE001 - live metrics are a view; the fit goes on
                warn_once("not logged", e)

    def pump() -> None:
        while not stop.wait(poll_s):
            drain()

    thread = threading.Thread(target=pump, name="step-relay", daemon=True)
    thread.start()
    try:
        yield name
    finally:
        stop.set()
        thread.join()
        drain()  # the last steps
        ray.kill(relay)


def _path_exists(path: str) -> bool:
    return os.path.exists(path)


def check_run_dir(run_dir: str | Path, ray_address: str | None = None) -> None:
    """Before any compute: a bucket ``run_dir`` must be writable from here (bucket, credentials, endpoint);
    a local one, on a Ray cluster of several nodes, must be seen by every node that does work (an NFS
    mount they share), or the stages on the other nodes would not find their inputs."""
    if is_uri(run_dir):
        try:
            probe_storage(run_dir)
        except StorageNotWritable as e:
            raise RunDirError(f"run_dir {e} (check the bucket, the credentials and AWS_ENDPOINT_URL "
                              "for an S3-compatible endpoint)") from None
        return
    import ray

    if not (ray.is_initialized() or ray_address or os.environ.get("RAY_ADDRESS")):
        return  # the stages start a local single-node cluster
    init_ray(ray_address)
    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in ray.nodes()
              if n["Alive"] and n["NodeID"] != here and (n["Resources"].get("CPU", 0) or n["Resources"].get("GPU", 0))]
    if not others:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root = run_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".visible-{os.getpid()}-{os.urandom(4).hex()}"
    probe.write_text("probe")
    try:
        task = ray.remote(num_cpus=0)(_path_exists)
        seen = ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(str(probe))
                        for n in others])
    finally:
        probe.unlink()
    blind = seen.count(False)
    if blind:
        raise RunDirError(f"run_dir {root} is a local folder that {blind} of the {len(others)} other Ray node(s) "
                          "do not see: set run_dir to a bucket URI (s3://bucket/prefix, gs://, abfs://) or to a "
                          "mount every node shares (NFS, EFS)")



# ------------------------------------------------------------------------------------------------
# the workers' logs, into the run folder
# ------------------------------------------------------------------------------------------------
def own_job_lines(text: str, job_id: str) -> tuple[str | None, str]:
    """The lines a Ray worker's log holds for ``job_id``, and the first actor or task name among them.

    A worker serves several jobs over its life; Ray marks each switch with ``:job_id:<hex>`` and
    ``:actor_name:``/``:task_name:`` lines (its own log streaming reads them too)."""
    name, current, kept = None, None, []
    for line in text.splitlines(keepends=True):
        if line.startswith(":job_id:"):
            current = line[len(":job_id:"):].strip()
        elif line.startswith((":actor_name:", ":task_name:")):
            if current == job_id and name is None:
                name = line.split(":", 2)[2].strip() or None
        elif current == job_id:
            kept.append(line)
    return name, "".join(kept)


def _local_logs_dir(ray) -> Path | None:
    try:
        return Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    except Exception:  # noqa: BLE001 - a Ray without this private path: the state API alone
        return None


def _read_local_worker_log(logs_dir: Path | None, pid: int, suffix: str) -> str | None:
    """The text of worker ``pid``'s log in this node's session (Ray names it ``worker-<id>-<job>-<pid>.<suffix>``)."""
    files = sorted(logs_dir.glob(f"worker-*-{pid}.{suffix}")) if logs_dir else []
    return "".join(f.read_text(errors="replace") for f in files) if files else None


def collect_worker_logs(folder: str | Path, since: float = 0.0, settle_s: float = 10.0) -> list[Path]:
    """Copy the stdout and stderr of every Ray worker that ran a task or actor of this driver's job (ended
    after ``since``, epoch seconds), on every node (through Ray's state API: no shared disk), to
    ``folder/<actor or task>-<node ip>-<pid>.{out,err}``.

    Returns the files written; a node that is gone (or a log Ray no longer has) is skipped with a debug line.
    ``settle_s``: task events reach the state API a second or more late (on a busy machine): the task list is
    read until two reads a second apart agree, for at most this long."""
    import time

    import ray

    if not ray.is_initialized():
        return []
    from ray.util.state import get_log, list_nodes, list_tasks

    log = logging.getLogger(__name__)
    context = ray.get_runtime_context()
    job, address = context.get_job_id(), context.gcs_address  # this cluster's, even with others on the machine
    deadline, seen = time.monotonic() + settle_s, -1
    try:
        while True:
            tasks = list_tasks(address=address, filters=[("job_id", "=", job)], detail=True, limit=10_000,
                               raise_on_missing_output=False)
            if (tasks and len(tasks) == seen) or time.monotonic() > deadline:
                break
            seen = len(tasks)
            time.sleep(1.0)
        ips = {n.node_id: n.node_ip for n in list_nodes(address=address, raise_on_missing_output=False)}
    except Exception as e:  # noqa: BLE001 - no dashboard (a cluster started without one): nothing to copy
        log.warning("worker logs not copied: Ray's state API did not answer (%s)", e)
        return []
    written = []
    here, local_logs = context.get_node_id(), _local_logs_dir(ray)
    recent = [t for t in tasks if t.node_id and t.worker_pid and (t.end_time_ms or 1e18) >= since * 1000]
    for node, pid in sorted({(t.node_id, t.worker_pid) for t in recent}):
        for suffix in ("out", "err"):
            try:
                text = "".join(get_log(address=address, node_id=node, pid=pid, suffix=suffix, timeout=30))
            except Exception as e:  # noqa: BLE001 - a node lost mid-run keeps its logs
                # this node's log agent may be missing (a second local cluster on one machine finds the agent's
                # fixed port taken): the driver's own node has the files on its disk
                text = _read_local_worker_log(local_logs, pid, suffix) if node == here else None
                if text is None:
                    log.debug("no %s log of worker %s on node %s: %s", suffix, pid, node, e)
                    continue
            name, own = own_job_lines(text, job)
            if own.strip():
                stem = re.sub(r"[^\w.()-]+", "_", f"{name or 'worker'}-{ips.get(node, node[:8])}-{pid}")
                written.append(atomic_write_text(Path(folder) / f"{stem}.{suffix}", own))
    return written


# ------------------------------------------------------------------------------------------------
# the GPUs' memory, read from the devices
# ------------------------------------------------------------------------------------------------
def parse_nvidia_smi(text: str) -> list[tuple[str, float]]:
    """(name, GiB) per GPU from ``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.strip().splitlines():
        name, _, mib = line.rpartition(",")
        if name.strip() and mib.strip():
            gpus.append((name.strip(), float(mib) / 1024))
    return gpus


def _node_gpus() -> list[tuple[str, float]]:
    """This node's GPUs: nvidia-smi sees them all without holding one (Ray hides them from a GPU-less task);
    without it, torch in a task that holds a GPU."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=60, check=False)
        if out.returncode == 0:
            return parse_nvidia_smi(out.stdout)
    return []


def _held_gpu() -> list[tuple[str, float]]:
    import torch

    if not torch.cuda.is_available():
        return []
    p = torch.cuda.get_device_properties(0)
    return [(p.name, p.total_memory / 2**30)]


def cluster_gpus(ray, timeout_s: float = 120.0) -> dict[str, list[tuple[str, float]]]:
    """Every alive GPU node's GPUs as (name, GiB), read on the node by a Ray task; {} when no node has GPUs.
    A node whose GPUs cannot be read within ``timeout_s`` (all busy, no nvidia-smi) maps to []."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    found: dict[str, list[tuple[str, float]]] = {}
    for node in ray.nodes():
        if not node["Alive"] or not node["Resources"].get("GPU"):
            continue
        here = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        gpus = ray.get(ray.remote(num_cpus=0)(_node_gpus).options(scheduling_strategy=here).remote(), timeout=timeout_s)
        if not gpus:
            ref = ray.remote(num_cpus=0, num_gpus=1)(_held_gpu).options(scheduling_strategy=here).remote()
            ready, _ = ray.wait([ref], timeout=timeout_s)
            gpus = ray.get(ready[0]) if ready else []
            if not ready:
                ray.cancel(ref, force=True)
        found[node["NodeManagerAddress"]] = gpus
    return found


def smallest_gpu_gib(gpus: dict[str, list[tuple[str, float]]]) -> tuple[float, str] | None:
    """The smallest GPU memory in GiB and a description of every node's GPUs; None when none could be read."""
    sizes = [gib for node in gpus.values() for _, gib in node]
    if not sizes:
        return None
    desc = "; ".join(f"{ip}: " + (", ".join(f"{n} {g:.0f} GiB" for n, g in node) or "unreadable")
                     for ip, node in sorted(gpus.items()))
    return min(sizes), desc
