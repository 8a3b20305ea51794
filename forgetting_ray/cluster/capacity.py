"""What the alive nodes can hold, counted per node. A demand they cannot hold is, in order:

* on an autoscaling cluster whose node types this process can read (cluster.autoscaler): refused at once
  when no mix of node types can ever hold it, naming the node types' shapes; otherwise requested from the
  autoscaler and waited for (up to ``resources.placement_timeout_s``, with progress lines), the request
  cleared once the nodes are up so that they idle out after the job;
* on a cluster this run started: refused before it waits forever;
* on a cluster joined by address without readable node types: a warning, and Ray's own placement waits,
  bounded by ``resources.placement_timeout_s``, which then names what was pending.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

from ..constants import RAY_DATA_TASK_CPUS
from ..errors import UserError
from . import autoscaler
from .autoscaler import Bundle, Infeasible, NodeType

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 30.0
POLL_S = 2.0


class PlacementTimeout(UserError, RuntimeError):
    """Workers, actors or trials that Ray did not place within ``resources.placement_timeout_s``."""


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


def gpu_node_resources(res: Any, gpus: float) -> Bundle:
    """The custom resources (``resources.gpu_node_resources``) a process holding ``gpus`` GPUs asks for."""
    return {k: v * gpus for k, v in res.gpu_node_resources.items()} if gpus else {}


def pool_bundles(pool: Any, res: Any) -> list[Bundle]:
    """An actor pool's bundles, and the whole CPU Ray Data's own tasks need beside them."""
    gpus = pool.num_gpus_per_actor
    actor = {"CPU": pool.num_cpus_per_actor, **({"GPU": gpus} if gpus else {}), **gpu_node_resources(res, gpus)}
    return [actor] * pool.concurrency + [{"CPU": RAY_DATA_TASK_CPUS}]


def check_actor_pool_cpus(ray, section: str, pool: Any, *, res: Any, error: type[Exception],
                          node_types: list[NodeType] | None = None) -> None:
    """Make room for an actor pool (``pool``: a config section with concurrency / num_cpus_per_actor /
    num_gpus_per_actor) that the alive nodes cannot place, or that leaves no node a whole CPU for Ray Data's
    own tasks (resources are per node, and the stage would wait forever): see the module's docstring.
    ``node_types``: the autoscaler's, when the caller knows them (default: read from the cluster)."""
    bundles, what = pool_bundles(pool, res), POOL_NAMES.get(section, section)
    if pool.num_gpus_per_actor:  # placed by their GPUs: their nodes keep CPUs for Ray Data
        if autoscaler.pack(bundles, alive_node_resources(ray)):
            return
        problem = (f"{what} need {autoscaler.describe_bundles(bundles)} ({section}.concurrency="
                   f"{pool.concurrency} x {section}.num_gpus_per_actor={pool.num_gpus_per_actor:g}); the cluster has "
                   f"{describe_nodes(ray)}: lower {section}.concurrency or add GPU nodes")
    else:
        nodes = alive_node_cpus(ray)
        if not starves_ray_data(pool, nodes):
            return
        problem = describe_pool_problem(section, pool, nodes)
    make_room(ray, problem, bundles, res=res, error=error, what=what, node_types=node_types)


def describe_nodes(ray) -> str:
    """Every alive node's CPUs and GPUs, for an error saying where nothing fitted."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    return ", ".join(f"{n['NodeManagerAddress']}:{n['NodeID'][:8]} {n['Resources'].get('CPU', 0):g} CPU "
                     f"{n['Resources'].get('GPU', 0):g} GPU" for n in nodes) or "no alive node"


def worker_bundle(res: Any) -> Bundle:
    """One Ray Train worker's resources (``ScalingConfig.resources_per_worker``)."""
    return {"CPU": res.cpus_per_worker, **({"GPU": 1.0} if res.use_gpu else {}),
            **gpu_node_resources(res, 1.0 if res.use_gpu else 0.0)}


def check_worker_group(ray, res: Any, *, error: type[Exception], held_cpus: float = 0.0,
                       node_types: list[NodeType] | None = None) -> None:
    """Make room for a Ray Train worker group that the alive nodes cannot hold, counted per node (each worker
    is one bundle of resources.cpus_per_worker CPUs, and a GPU on GPU), or refuse it: see the module's
    docstring.  ``held_cpus``: what the calling process already holds on one node (a Tune trial)."""
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
    bundles = [worker_bundle(res)] * res.num_workers + ([{"CPU": held_cpus}] if held_cpus else [])
    make_room(ray, problem, bundles, res=res, error=error, what="training workers", node_types=node_types)


def joined_cluster(res: Any) -> bool:
    """This run joined a cluster by address (its own setting, or $RAY_ADDRESS as in a submitted job) rather
    than starting one."""
    return bool(res.ray_address or os.environ.get("RAY_ADDRESS"))


def make_room(ray, problem: str, bundles: list[Bundle], *, res: Any, error: type[Exception], what: str,
              node_types: list[NodeType] | None = None) -> None:
    """The alive nodes cannot hold ``bundles`` (``problem`` says why in the settings' words): let the
    autoscaler add nodes, or refuse, or warn -- see the module's docstring."""
    types = node_types if node_types is not None else autoscaler.cluster_node_types()
    if types is None:
        if not joined_cluster(res):
            raise error(problem)
        log.warning("%s (continuing: an autoscaler may add nodes; resources.placement_timeout_s=%g bounds the "
                    "wait)", problem, res.placement_timeout_s)
        return
    try:
        launches = autoscaler.nodes_to_launch(bundles, alive_node_resources(ray), types,
                                              autoscaler.running_nodes_by_type())
    except Infeasible as e:
        raise error(f"{what}: {autoscaler.describe_bundles(bundles)} can never be placed on this cluster: {e}. "
                    f"{problem}") from None
    wait_for_autoscaler(ray, bundles, what=what, launches=launches, timeout_s=res.placement_timeout_s)


def alive_node_resources(ray) -> list[Bundle]:
    return [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n["Alive"]]


def wait_for_autoscaler(ray, bundles: list[Bundle], *, what: str, launches: dict[str, int], timeout_s: float) -> None:
    """Ask the autoscaler for ``bundles`` and wait until the alive nodes hold them; the request is cleared
    either way, so the nodes idle out once the stage is done."""
    wanted = ", ".join(f"{n} {t}" for t, n in launches.items()) or "no new node"
    log.warning("waiting for %s (%s) -- the autoscaler needs %s", autoscaler.describe_bundles(bundles), what, wanted)
    start = last = time.monotonic()
    autoscaler.request(bundles)
    try:
        while not autoscaler.pack(bundles, alive_node_resources(ray)):
            now = time.monotonic()
            if now - start > timeout_s:
                raise placement_timeout_error(f"{what} ({autoscaler.describe_bundles(bundles)})",
                                              "the stage's resources", timeout_s, ray)
            if now - last >= PROGRESS_EVERY_S:
                last = now
                log.warning("waiting for %s -- autoscaler %s (%.0f s of resources.placement_timeout_s=%g)",
                            autoscaler.describe_bundles(bundles), autoscaler.launching(), now - start, timeout_s)
            time.sleep(POLL_S)
    finally:
        autoscaler.request([])
    log.warning("%s: the cluster holds %s after %.0f s", what, autoscaler.describe_bundles(bundles),
                time.monotonic() - start)


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
