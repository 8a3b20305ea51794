"""Packing a stage's bundles into alive nodes and the autoscaler's node types (forgetting_ray.cluster.autoscaler),
and what a stage does with the answer on an autoscaling cluster (forgetting_ray.cluster.capacity.make_room):
refuse at once what no node type can hold, otherwise ask the autoscaler, wait with progress, clear the request."""

from __future__ import annotations

import logging
import time

import pytest
import yaml

from forgetting_ray.cluster import autoscaler, capacity
from forgetting_ray.cluster.autoscaler import Infeasible, NodeType, nodes_to_launch, node_types_from_config, pack
from forgetting_ray.cluster.capacity import check_actor_pool_cpus, check_worker_group
from forgetting_ray.config import ResourcesConfig, ScoringConfig

from conftest import FakeRayNodes as _Nodes

GPU_TYPES = [NodeType("gpu_8b", {"CPU": 48, "GPU": 4, "gpu_8b": 4}, 4),
             NodeType("gpu_13b", {"CPU": 96, "GPU": 8, "gpu_13b": 8}, 2)]
HEAD = {"CPU": 0.0}


def test_pack_is_per_node_and_largest_first():
    assert pack([{"CPU": 1}] * 2, [HEAD, {"CPU": 1}, {"CPU": 1}])
    assert not pack([{"CPU": 2}], [HEAD, {"CPU": 1}, {"CPU": 1}])  # 2 CPUs in all, none on one node
    # the 2-CPU bundle first: placed smallest-first, the 1-CPU bundles would split the 2-CPU node
    assert pack([{"CPU": 1}, {"CPU": 1}, {"CPU": 2}], [{"CPU": 2}, {"CPU": 1}, {"CPU": 1}])
    assert not pack([{"CPU": 1, "gpu_13b": 1}], [{"CPU": 48, "GPU": 4, "gpu_8b": 4}])


def test_nodes_to_launch_counts_nodes_of_the_smallest_type_that_holds_each_bundle():
    four_gpu_workers = [{"CPU": 1, "GPU": 1}] * 4
    assert nodes_to_launch(four_gpu_workers, [HEAD], GPU_TYPES) == {"gpu_8b": 1}
    assert nodes_to_launch([{"CPU": 1, "GPU": 1}] * 6, [HEAD], GPU_TYPES) == {"gpu_8b": 2}
    assert nodes_to_launch([{"CPU": 1, "GPU": 1, "gpu_13b": 1}] * 8, [HEAD], GPU_TYPES) == {"gpu_13b": 1}
    # alive nodes are used first, and running nodes count against max_workers
    assert nodes_to_launch(four_gpu_workers, [HEAD, GPU_TYPES[0].resources], GPU_TYPES) == {}
    with pytest.raises(Infeasible, match=r"max_workers allows of gpu_13b \(2\)"):
        nodes_to_launch([{"CPU": 1, "gpu_13b": 1}] * 9, [HEAD], GPU_TYPES, running={"gpu_13b": 1})


def test_a_bundle_no_node_type_holds_is_named_with_the_node_types_largest_first():
    with pytest.raises(Infeasible) as e:
        nodes_to_launch([{"CPU": 1, "GPU": 16}], [HEAD], GPU_TYPES)
    assert str(e.value) == ("no node type can ever hold {CPU: 1, GPU: 16}; the node types are gpu_13b "
                            "{CPU: 96, GPU: 8, gpu_13b: 8} x<=2, gpu_8b {CPU: 48, GPU: 4, gpu_8b: 4} x<=4")


def test_node_types_come_from_the_autoscaler_yaml_without_the_head(tmp_path):
    config = yaml.safe_load("""
max_workers: 6
head_node_type: head
available_node_types:
  head: {resources: {CPU: 0}, node_config: {}}
  gpu_8b: {min_workers: 0, max_workers: 4, resources: {CPU: 48, GPU: 4, gpu_8b: 4}}
  cpu: {resources: {CPU: 2}}
""")
    assert node_types_from_config(config) == [NodeType("gpu_8b", {"CPU": 48.0, "GPU": 4.0, "gpu_8b": 4.0}, 4),
                                              NodeType("cpu", {"CPU": 2.0}, 6)]


@pytest.fixture
def autoscaler_calls(monkeypatch):
    """Record the autoscaler requests; the 'cluster' gains a node once a request is made."""
    calls: list[list[dict]] = []
    monkeypatch.setattr(autoscaler, "request", lambda bundles: calls.append(list(bundles)))
    monkeypatch.setattr(autoscaler, "running_nodes_by_type", lambda: {})
    monkeypatch.setattr(autoscaler, "launching", lambda: "launching 1 gpu_8b")
    return calls


class _Growing(_Nodes):
    """A cluster whose nodes appear after ``after`` polls of ``nodes()``."""

    def __init__(self, now: list[dict], later: list[dict], after: int):
        super().__init__(*now)
        self._later, self._after = _Nodes(*later)._nodes, after

    def nodes(self):
        self._after -= 1
        return self._nodes if self._after >= 0 else self._later


def test_an_infeasible_stage_is_refused_at_once_naming_request_and_node_types(autoscaler_calls):
    res = ResourcesConfig(num_workers=2, use_gpu=True, gpu_node_resources={"gpu_13b": 1}, ray_address="auto")
    small = [NodeType("gpu_8b", {"CPU": 48, "GPU": 4, "gpu_8b": 4}, 4)]
    t0 = time.monotonic()
    with pytest.raises(ValueError) as e:
        check_worker_group(_Nodes(HEAD), res, error=ValueError, node_types=small)
    assert time.monotonic() - t0 < 1 and autoscaler_calls == []
    assert "2 x {CPU: 1, GPU: 1, gpu_13b: 1} can never be placed" in str(e.value)
    assert "gpu_8b {CPU: 48, GPU: 4, gpu_8b: 4} x<=4" in str(e.value)


def test_a_satisfiable_stage_asks_waits_with_progress_and_clears_the_request(autoscaler_calls, monkeypatch, caplog):
    monkeypatch.setattr(capacity, "POLL_S", 0.01)
    monkeypatch.setattr(capacity, "PROGRESS_EVERY_S", 0.0)
    res = ResourcesConfig(num_workers=4, use_gpu=True)  # not joined: the node types decide, not the address
    cluster = _Growing([HEAD], [HEAD, GPU_TYPES[0].resources], after=6)
    with caplog.at_level(logging.WARNING, logger=capacity.__name__):
        check_worker_group(cluster, res, error=ValueError, node_types=GPU_TYPES)
    assert autoscaler_calls == [[{"CPU": 1.0, "GPU": 1.0}] * 4, []]  # asked, then cleared
    text = caplog.text
    assert "waiting for 4 x {CPU: 1, GPU: 1} (training workers) -- the autoscaler needs 1 gpu_8b" in text
    assert "autoscaler launching 1 gpu_8b" in text and "the cluster holds 4 x {CPU: 1, GPU: 1}" in text


def test_a_wait_that_runs_out_names_what_was_pending_and_still_clears(autoscaler_calls, monkeypatch):
    monkeypatch.setattr(capacity, "POLL_S", 0.01)
    pool = ScoringConfig(concurrency=2, num_cpus_per_actor=4, num_gpus_per_actor=1)
    res = ResourcesConfig(placement_timeout_s=0.05, gpu_node_resources={"gpu_8b": 1})
    with pytest.raises(capacity.PlacementTimeout, match="scoring actors"):
        check_actor_pool_cpus(_Nodes(HEAD), "scoring", pool, res=res, error=ValueError, node_types=GPU_TYPES)
    assert autoscaler_calls == [[{"CPU": 4.0, "GPU": 1.0, "gpu_8b": 1.0}] * 2 + [{"CPU": 1.0}], []]


def test_without_node_types_a_started_cluster_refuses_and_a_joined_one_warns(monkeypatch, caplog):
    monkeypatch.setattr(autoscaler, "cluster_node_types", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="resources.num_workers=2"):
        check_worker_group(_Nodes(HEAD, {"CPU": 1}), ResourcesConfig(num_workers=2), error=ValueError)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a submitted job's driver: joined, as the README submits
    with caplog.at_level(logging.WARNING, logger=capacity.__name__):
        check_worker_group(_Nodes(HEAD, {"CPU": 1}), ResourcesConfig(num_workers=2), error=ValueError)
    assert "an autoscaler may add nodes" in caplog.text
