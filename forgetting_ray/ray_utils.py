"""Starting or joining Ray, with the environment every worker of the pipeline needs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

# Passed to every Ray worker: DeepSpeed must pick the CPU accelerator without guessing on CPU
# boxes, its JIT ops must land in one shared cache, and nothing may reach for a model hub.
WORKER_ENV_VARS = (
    "DS_ACCELERATOR",
    "TORCH_EXTENSIONS_DIR",
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "FORGETTING_RAY_CACHE",
    "TOKENIZERS_PARALLELISM",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_DISABLE_TELEMETRY",
    "PYTHONPATH",
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
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, **kwargs)
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=kwargs.pop("include_dashboard", True),
            dashboard_host="127.0.0.1",
            runtime_env=runtime_env,
            **kwargs,
        )
    return ray


def default_storage_path(run_dir: str | Path) -> str:
    return str((Path(run_dir) / "ray_storage").resolve())


# CPUs an actor pool must leave to Ray Data's own tasks: reads/writes fit in a fraction of a CPU, but the eval
# stage's repartition tasks each need a whole one (STACK_NOTES Exp 3).
SCORING_CPU_RESERVE = 0.25
EVAL_CPU_RESERVE = 1.0


def starves_ray_data(pool: Any, total_cpus: float, reserve: float) -> bool:
    """True when a CPU actor pool leaves Ray Data fewer than ``reserve`` of ``total_cpus``."""
    return not pool.num_gpus_per_actor and pool.concurrency * pool.num_cpus_per_actor > total_cpus - reserve


def check_actor_pool_cpus(ray, section: str, pool: Any, *, reserve: float, ray_address: str | None,
                          error: type[Exception]) -> None:
    """Refuse an actor pool (``pool``: a config section with concurrency / num_cpus_per_actor /
    num_gpus_per_actor) that leaves Ray Data's own read, repartition and write tasks fewer than
    ``reserve`` CPUs: the stage would wait forever without an error (STACK_NOTES Exp 3).

    On a cluster joined by address an autoscaler may still add nodes, so there it only warns.
    """
    total = ray.cluster_resources().get("CPU", 0.0)
    if not starves_ray_data(pool, total, reserve):
        return
    need = pool.concurrency * pool.num_cpus_per_actor
    problem = (f"{section}.concurrency={pool.concurrency} x {section}.num_cpus_per_actor={pool.num_cpus_per_actor} "
               f"= {need:g} CPUs leaves less than {reserve:g} of the cluster's {total:g} CPUs for Ray Data's own "
               f"tasks, and the stage would hang: lower {section}.num_cpus_per_actor (e.g. 0.5) or "
               f"{section}.concurrency")
    if ray_address is None:
        raise error(problem)
    logging.getLogger(__name__).warning("%s (continuing: an autoscaler may add nodes)", problem)
