"""What the alive nodes can hold, counted per node: a demand no node can hold is refused before it waits
forever (or, joined by address, warned about), and a pending demand stops after
``resources.placement_timeout_s`` naming what was pending."""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Any, Iterator

from ..constants import RAY_DATA_TASK_CPUS
from ..errors import UserError


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
