"""Actor-pool placement per node (forgetting_ray.cluster.capacity): the rule every stage applies before it starts a
pool, so that nothing waits forever for a CPU that no node has."""

from __future__ import annotations

import pytest

from forgetting_ray.cluster.capacity import (
    check_worker_group,
    describe_pool_problem,
    largest_fitting_concurrency,
    spread_actors,
    starves_ray_data,
)
from forgetting_ray.config import EvalConfig, ResourcesConfig, ScoringConfig, load_config
from forgetting_ray.search import default_max_concurrent, trial_cpus
from conftest import FakeRayNodes as _Nodes

HEAD_AND_TWO_WORKERS = [0.0, 1.0, 1.0]  # cluster.yaml's layout in small: a head without CPUs


def test_actors_spread_to_the_emptiest_node():
    assert spread_actors([2.0], 2, 0.5) == [1.0]
    assert spread_actors(HEAD_AND_TWO_WORKERS, 2, 0.5) == [0.0, 0.5, 0.5]
    assert spread_actors(HEAD_AND_TWO_WORKERS, 3, 1.0) is None  # the third actor has no node
    assert spread_actors([], 1, 0.5) is None


@pytest.mark.parametrize("nodes, concurrency, cpus, starves", [
    ([2.0], 2, 0.5, False),               # the demo on one 2-CPU machine: 1 CPU left for Ray Data
    ([2.0], 2, 1.0, True),                # nothing left
    (HEAD_AND_TWO_WORKERS, 2, 0.5, True),  # the measured hang: 0.5 left on each worker node
    (HEAD_AND_TWO_WORKERS, 1, 0.5, False),  # one worker node stays whole
    ([2.0], 8, 0.5, True),                # cannot even be placed
])
def test_a_pool_must_leave_one_node_a_whole_cpu(nodes, concurrency, cpus, starves):
    assert starves_ray_data(ScoringConfig(concurrency=concurrency, num_cpus_per_actor=cpus), nodes) is starves


def test_gpu_actors_are_not_held_to_the_cpu_rule():
    assert not starves_ray_data(ScoringConfig(concurrency=4, num_cpus_per_actor=4, num_gpus_per_actor=1), [8.0] * 4)


def test_the_error_names_the_settings_and_a_concurrency_that_fits():
    pool = ScoringConfig(concurrency=2, num_cpus_per_actor=0.5)
    assert largest_fitting_concurrency(pool, HEAD_AND_TWO_WORKERS) == 1
    text = describe_pool_problem("scoring", pool, HEAD_AND_TWO_WORKERS)
    assert "scoring.concurrency=2 x scoring.num_cpus_per_actor=0.5 on nodes with 0, 1, 1 CPUs" in text
    assert "set scoring.concurrency=1" in text
    assert "add a node" in describe_pool_problem("eval", EvalConfig(concurrency=1, num_cpus_per_actor=1.0), [1.0])


def test_a_trial_counts_its_evaluation_pool_and_the_ray_data_task():
    demo = load_config("examples/demo.yaml", ["tune.enabled=true"])  # eval_mean: 2 x 0.5 CPU eval actors
    assert trial_cpus(demo) == pytest.approx(0.1 + 2 * 0.5 + 1.0)
    assert default_max_concurrent(demo, {"CPU": 8}) == 3
    val = load_config("examples/demo.yaml", ["tune.enabled=true", "tune.objective=val_nll"])
    assert trial_cpus(val) == pytest.approx(1.1)  # training's one worker CPU is the peak


def test_a_worker_group_is_counted_per_node_and_refused_before_it_waits():
    two_small = _Nodes({"CPU": 0}, {"CPU": 1}, {"CPU": 1})  # a head without CPUs, two 1-CPU workers
    check_worker_group(two_small, ResourcesConfig(num_workers=2, cpus_per_worker=1), error=ValueError)
    with pytest.raises(ValueError) as e:  # 2 CPUs in all, but no node holds a 2-CPU worker
        check_worker_group(two_small, ResourcesConfig(num_workers=1, cpus_per_worker=2), error=ValueError)
    assert "resources.num_workers=1" in str(e.value) and "resources.cpus_per_worker=2" in str(e.value)
    assert "0 CPU" in str(e.value) and "1 CPU" in str(e.value)  # where: every node's resources
    with pytest.raises(ValueError, match="beside the 0.1 CPU its trial holds"):  # a trial's own share counts
        check_worker_group(_Nodes({"CPU": 1}), ResourcesConfig(num_workers=1, cpus_per_worker=1), error=ValueError,
                           held_cpus=0.1)
    with pytest.raises(ValueError, match="1 GPU"):
        check_worker_group(_Nodes({"CPU": 8, "GPU": 1}), ResourcesConfig(num_workers=2, use_gpu=True), error=ValueError)
    # joined by address: an autoscaler may add the nodes, and placement_timeout_s bounds the wait
    check_worker_group(two_small, ResourcesConfig(num_workers=1, cpus_per_worker=2, ray_address="10.0.0.1:6379"),
                       error=ValueError)
