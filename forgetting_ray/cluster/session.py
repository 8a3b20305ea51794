"""Starting or joining Ray, with the environment every worker of the pipeline needs."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..console import quiet, route_ray_logs
from ..store import join_storage
from .internals import pin_ray_data_stats_to_driver

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


# Ray's job manager hands the submitted job's config (its runtime env included) to the driver in this variable.
RAY_JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_env_var_names() -> set[str]:
    """Variables the submitted job's own runtime env sets (``ray job submit --runtime-env-json``).

    Ray refuses a driver whose ``ray.init`` runtime env sets any of them again ("Failed to merge the Job's
    runtime env ... because of a conflict"), and the job's values already reach every worker.
    """
    raw = os.environ.get(RAY_JOB_CONFIG_VAR)
    if not raw:
        return set()
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
        return set(runtime_env.get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


def worker_env() -> dict[str, str]:
    """What every worker needs from this process's environment, less what the submitted job already sets."""
    env = {k: os.environ[k] for k in WORKER_ENV_VARS if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in job_env_var_names():
        env.pop(name, None)
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
        pin_ray_data_stats_to_driver()  # an autoscaler can then remove idle worker nodes
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


# Ray Data's parquet reader starts a pool of actor processes per read to fetch the files' footers: 32 by default
# (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS, read in this process when the Dataset is built).  The pipeline's reads are
# its own token tables, one parquet file each: one actor does all the work, and each of the other 31 costs a worker
# process start (about 2 s apiece on a 2-core node; a 71 s score stage on three nodes, BENCHMARKS.md "Multi-node
# cluster path").
FOOTER_ACTORS_VAR = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


@contextmanager
def one_footer_actor() -> Iterator[None]:
    """Around building a Dataset over one parquet file: one footer actor, unless the user set the variable."""
    if FOOTER_ACTORS_VAR in os.environ:
        yield
        return
    os.environ[FOOTER_ACTORS_VAR] = "1"
    try:
        yield
    finally:
        os.environ.pop(FOOTER_ACTORS_VAR, None)


@contextmanager
def working_in(folder: Path) -> Iterator[None]:
    """Run the block with ``folder`` (absolute) as the cwd, then return to the cwd's path as it is by then.

    A Ray job's cwd is its unpacked working_dir, and Ray unpacks it again (delete, then extract) when a node
    that shares the Ray temp dir sets up the same runtime env: a shared /tmp/ray, or Ray's fake multi-node
    provider.  Tune's driver resolves bucket paths against the cwd (``os.path.relpath`` in
    ``ray.train._internal.storage``), so a cwd removed under it fails a finished search.  It can be replaced
    before the block as well (a node added while the job's first stages ran): the path is then the shell's $PWD.
    """
    try:
        before = os.getcwd()
    except FileNotFoundError:
        before = os.environ.get("PWD", "")  # Ray starts the entrypoint with `cd DIR && ...`
    os.chdir(folder)
    try:
        yield
    finally:
        try:
            os.chdir(before)  # the path, unpacked again if Ray replaced it
        except OSError:
            pass  # gone for good: ``folder`` stays the cwd
