"""Never wait forever: on a cluster joined by address (where an autoscaler may still add nodes, so nothing is
refused up front) a worker group or an actor pool that Ray cannot place stops after
resources.placement_timeout_s with one error naming what was pending, where, and the settings to change.

The session's 2-CPU cluster is joined through its own address; each stage asks for 3 whole CPUs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from forgetting_ray.cluster.capacity import PlacementTimeout
from forgetting_ray.config import PipelineConfig
from forgetting_ray.models import load_tokenizer, tokenizer_fingerprint
from forgetting_ray.stages.score import run_score
from forgetting_ray.stages.train import run_finetune
from conftest import make_partitioned_table

from .test_score import make_rows, write_table

TIMEOUT_S = 4


def joined_cfg(ray, run_dir: Path, model: Path, **sections) -> PipelineConfig:
    address = ray.get_runtime_context().gcs_address
    return PipelineConfig.model_validate({
        "run_dir": str(run_dir), "model": {"name_or_path": str(model)},
        "resources": {"ray_address": address, "placement_timeout_s": TIMEOUT_S, **sections.pop("resources", {})},
        **sections})


def test_a_worker_group_that_never_places_stops_after_the_timeout(ray_cluster, tmp_path, tiny_llama,
                                                                  tiny_tokenizer_dir):
    table = tmp_path / "train.parquet"
    pq.write_table(make_partitioned_table(tiny_tokenizer_dir, n=16), table)
    cfg = joined_cfg(ray_cluster, tmp_path / "run", tiny_llama, resources={"num_workers": 3, "cpus_per_worker": 1},
                     training={"lora": {"enabled": False}, "deepspeed": {"enabled": False}, "max_steps": 2})
    start = time.monotonic()
    with pytest.raises(PlacementTimeout) as e:
        run_finetune(cfg, "train", table)
    msg = str(e.value)
    assert "3 training worker(s) of 1 CPU" in msg and f"placement_timeout_s={TIMEOUT_S}" in msg
    assert "resources.num_workers" in msg and "2 CPU" in msg  # what to change, and what the cluster has
    assert time.monotonic() - start < 120
    assert not list((tmp_path / "run").glob("train/*/_SUCCESS.json"))
    # the cluster is free again: nothing of the stopped group holds a CPU
    assert ray_cluster.available_resources().get("CPU", 0) == pytest.approx(2.0)


def test_an_actor_pool_that_never_places_stops_after_the_timeout(ray_cluster, tmp_path, tiny_llama):
    tok = load_tokenizer(tiny_llama)
    table = write_table(make_rows(tok, 8), tmp_path / "prepare", tokenizer_fingerprint(tok))
    cfg = joined_cfg(ray_cluster, tmp_path / "run", tiny_llama,
                     scoring={"concurrency": 3, "num_cpus_per_actor": 1, "shard_size": 4})
    with pytest.raises(PlacementTimeout) as e:
        run_score(cfg, table, tiny_llama)
    msg = str(e.value)
    assert "scoring.concurrency=3 of 1 CPU" in msg and "scoring.num_cpus_per_actor" in msg
    assert not list((tmp_path / "run").glob("score/*/_SUCCESS.json"))


def test_tune_stops_when_its_trials_stay_pending(ray_cluster):
    """Tune keeps an unplaceable trial PENDING forever; the search's watch stops it once nothing has run for
    the timeout (a trial that runs resets the clock)."""
    from types import SimpleNamespace

    from forgetting_ray.tuning.callbacks import PendingTrialWatch, tune_callback

    watch = tune_callback(PendingTrialWatch, timeout_s=0.2)
    pending, running = SimpleNamespace(status="PENDING"), SimpleNamespace(status="RUNNING")
    watch.on_step_begin(0, [pending])
    time.sleep(0.3)
    watch.on_step_begin(1, [pending, running])  # one trial runs: waiting for a free slot is not a hang
    watch.on_step_begin(2, [pending])
    with pytest.raises(PlacementTimeout, match="Tune trials .* tune.max_concurrent_trials"):
        time.sleep(0.3)
        watch.on_step_begin(3, [pending])
