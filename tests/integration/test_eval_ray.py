"""run_eval on a Ray Data actor pool (2 actors x 0.5 CPU) gives the same answers as in-process."""

from __future__ import annotations

import json

import pytest

from forgetting_ray.config import PipelineConfig
from forgetting_ray.stages.evaluate import run_eval

from conftest import EVAL_DIR


def _cfg(tmp_path, backend: str) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "run_dir": str(tmp_path / "run"),
        "tracking": {"enabled": False},
        "eval": {"data_dir": str(EVAL_DIR), "tasks": ["boolq", "truthfulqa", "asdiv"], "limit": 4,
                 "limit_mode": "random", "backend": backend, "concurrency": 2, "num_cpus_per_actor": 0.5,
                 "batch_size": 2, "asdiv_max_new_tokens": 4},
    })


def test_ray_actor_pool_matches_local(ray_cluster, tiny_llama, tmp_path):
    ray_res = run_eval(_cfg(tmp_path, "ray"), str(tiny_llama), tmp_path / "ray")
    local = run_eval(_cfg(tmp_path, "local"), str(tiny_llama), tmp_path / "local")
    assert set(ray_res.metrics) == {"boolq", "truthfulqa", "asdiv"}
    for task in ray_res.metrics:
        a = [json.loads(x) for x in (tmp_path / "ray" / "samples" / f"{task}.jsonl").read_text().splitlines()]
        b = [json.loads(x) for x in (tmp_path / "local" / "samples" / f"{task}.jsonl").read_text().splitlines()]
        assert len(a) == len(b) == 4
        assert [r["doc_id"] for r in a] == [r["doc_id"] for r in b]
        assert [r["pred"] for r in a] == [r["pred"] for r in b]
        for ra, rb in zip(a, b):
            for key in ("lls", "lls_mc2"):
                if key in ra:
                    assert ra[key] == pytest.approx(rb[key], abs=1e-4)
    assert ray_res.metrics["boolq"]["acc"] == local.metrics["boolq"]["acc"]
    assert ray_res.metrics["truthfulqa"]["mc2"] == pytest.approx(local.metrics["truthfulqa"]["mc2"], abs=1e-5)


def test_actor_pool_that_would_starve_ray_data_is_refused(ray_cluster, tiny_llama, tmp_path):
    from forgetting_ray.stages.evaluate import EvalConfigError

    cfg = _cfg(tmp_path, "ray")
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"concurrency": 2, "num_cpus_per_actor": 1.0})})
    with pytest.raises(EvalConfigError, match="eval.num_cpus_per_actor"):
        run_eval(cfg, str(tiny_llama), tmp_path / "starved")
    assert not (tmp_path / "starved" / "results.json").exists()


def test_lm_eval_harness_runs_in_a_ray_task_on_the_eval_resources(ray_cluster, tiny_llama, tmp_path):
    pytest.importorskip("lm_eval")
    from ray.util.state import list_tasks

    def cfg(backend: str) -> PipelineConfig:
        return _cfg(tmp_path, backend).model_copy(update={"eval": _cfg(tmp_path, backend).eval.model_copy(
            update={"tasks": ["boolq"], "limit": 3, "num_cpus_per_actor": 1.0})})

    in_ray = run_eval(cfg("ray"), str(tiny_llama), tmp_path / "lm_eval_ray", harness="lm-eval")
    here = run_eval(cfg("local"), str(tiny_llama), tmp_path / "lm_eval_local", harness="lm-eval")
    assert in_ray.metrics["boolq"] == here.metrics["boolq"]
    address = ray_cluster.get_runtime_context().gcs_address  # other clusters may share this machine
    ran = [t for t in list_tasks(address=address, filters=[("name", "=", "lm_eval")], detail=True)
           if t.state == "FINISHED"]
    assert ran and all(t.required_resources.get("CPU") == 1.0 for t in ran)
