"""A demand no node can place stops the stage with what is pending, instead of waiting forever."""

from __future__ import annotations

import time

import pytest

from forgetting_ray.ray_utils import ResourcesPendingError, pending_watchdog


def test_a_task_no_node_can_place_stops_the_stage_naming_it(ray_cluster):
    import ray

    @ray.remote(num_cpus=64)
    def too_big() -> int:
        return 1

    t0 = time.monotonic()
    ref = too_big.remote()
    try:
        with pytest.raises(ResourcesPendingError, match=r"score: waited more than 2 s .*too_big.*'CPU': 64"):
            with pending_watchdog("score", 2, poll_s=0.5):
                ray.get(ref)
    finally:
        ray.cancel(ref, force=True)  # the session's cluster is shared with later tests
    assert time.monotonic() - t0 < 60


def test_placeable_work_and_a_disabled_watchdog_are_left_alone(ray_cluster):
    import ray

    @ray.remote(num_cpus=1)
    def small() -> int:
        time.sleep(2)
        return 1

    with pending_watchdog("score", 15, poll_s=0.5):  # pending only while a worker process starts
        assert ray.get([small.remote() for _ in range(4)]) == [1] * 4  # two at a time: queued, not stuck
    with pending_watchdog("score", None):
        assert ray.get(small.remote()) == 1
