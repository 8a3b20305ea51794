"""The GPUs' memory, read from the devices on every GPU node; a process's own peak host memory."""

from __future__ import annotations

from pathlib import Path


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



def _resident_bytes(mapped_files: bool) -> int | None:
    """Resident anonymous + shared-memory bytes of this process, + file pages when ``mapped_files`` (Linux);
    None where /proc is not there."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    fields = ("RssAnon:", "RssShmem:", "RssFile:") if mapped_files else ("RssAnon:", "RssShmem:")
    kib = [int(line.split()[1]) for line in status.splitlines() if line.startswith(fields)]
    return sum(kib) * 1024 if kib else None


class PeakMemory:
    """This process's peak resident memory, sampled every ``interval_s`` by a daemon thread.

    By default private memory: anonymous + shared-memory pages, what the process allocated and the kernel
    cannot drop. A training worker maps the safetensors file only while it copies its partition out of it,
    page cache the kernel reclaims under pressure, so those pages do not count. ``mapped_files=True`` counts
    them: a scoring actor computes from weights mapped from the file (fp32 on disk, fp32 in memory: torch
    keeps the mapping) and reads all of them on every batch. The kernel's own high-water mark (ru_maxrss,
    which counts both) is the fallback where there is no /proc. A spike shorter than the interval can be missed.
    """

    def __init__(self, interval_s: float = 0.05, *, mapped_files: bool = False):
        import threading

        self._mapped_files = mapped_files
        self._peak = self._now()
        self._lock = threading.Lock()
        if self._peak is not None:
            threading.Thread(target=self._sample, args=(interval_s,), daemon=True, name="peak-memory").start()

    def _sample(self, interval_s: float) -> None:
        import time

        while True:
            self._observe()
            time.sleep(interval_s)

    def _now(self) -> int | None:
        return _resident_bytes(self._mapped_files)

    def _observe(self) -> int:
        now = self._now() or 0
        with self._lock:
            self._peak = max(self._peak or 0, now)
            return self._peak

    def peak_bytes(self, *, reset: bool = False) -> int:
        """The peak so far (``reset``: then start a new window from the current level)."""
        if self._peak is None:
            import resource
            import sys

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        peak = self._observe()
        if reset:
            with self._lock:
                self._peak = self._now() or 0
        return peak
