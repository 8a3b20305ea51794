"""The GPUs' memory as nvidia-smi reports it (forgetting_ray.cluster.devices)."""

from __future__ import annotations

from forgetting_ray.cluster.devices import parse_nvidia_smi, smallest_gpu_gib


def test_gpu_memory_as_nvidia_smi_reports_it():
    smi = "NVIDIA H100 80GB HBM3, 81559\nNVIDIA H100 80GB HBM3, 81559\n"
    assert parse_nvidia_smi(smi) == [("NVIDIA H100 80GB HBM3", 81559 / 1024)] * 2
    l40s = parse_nvidia_smi("NVIDIA L40S, 46068\n")
    gib, desc = smallest_gpu_gib({"10.0.0.2": parse_nvidia_smi(smi), "10.0.0.3": l40s, "10.0.0.4": []})
    assert gib == 46068 / 1024 and "10.0.0.3: NVIDIA L40S 45 GiB" in desc and "10.0.0.4: unreadable" in desc
    assert smallest_gpu_gib({}) is None and smallest_gpu_gib({"10.0.0.4": []}) is None


def test_peak_memory_sees_a_freed_allocation_and_resets_to_the_current_level():
    import numpy as np

    from forgetting_ray.cluster.devices import PeakMemory

    memory = PeakMemory()
    before = memory.peak_bytes(reset=True)
    block = np.ones(256 * 2**20, dtype=np.uint8)  # touched pages: resident, private
    held = memory.peak_bytes()
    del block
    after_free = memory.peak_bytes(reset=True)
    assert held - before >= 250 * 2**20
    assert after_free >= held  # the peak outlives the allocation
    assert memory.peak_bytes() < held - 200 * 2**20  # a new window starts from what is resident now
