"""Before any compute: the run folder is reachable from every node that does work.

Here, not in ``store.py``: the multi-node check runs a Ray task on each node, and ``store`` stays Ray-free."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..store import StorageNotWritable, is_uri, probe_storage, run_root
from .session import init_ray


class RunDirError(UserError, OSError):
    """``run_dir`` cannot hold the run: an unreachable bucket, or a local folder other nodes do not see."""


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
