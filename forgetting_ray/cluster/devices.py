"""The GPUs' memory, read from the devices on every GPU node."""

from __future__ import annotations


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
