"""Benchmark: the SCORE stage's scaling from one Ray worker node to two, in one run.

A multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head without CPUs, worker nodes
of 2 CPUs each, each its own raylet and object store), SmolLM2-135M with a random LoRA reference as in
``bench_scoring.py``.  First one worker node with one 1-CPU scoring actor, then a second node joins and the
same rows are scored with two actors (the per-node rule leaves each node a CPU for Ray Data's tasks).
Reported: the whole stage call, the fixed start-up (Ray Data plan, actor start with model load: up to the
first scored batch) and the compute part after it, and the 2-node / 1-node ratios (goal >= 1.8x on the
compute part).

On a machine with fewer physical cores than the nodes declare, the ratio measures the machine's contention
rather than the stage: the table prints the core count and the load average beside it.

Usage: ``python bench/bench_score_nodes.py [--samples 64]`` (about 5 minutes on 2 idle cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scoring import build_reference, smollm2_scoring_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".cache" / "bench_score_nodes"
NODE_CPUS = 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64, help="training rows to score")
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--out", default=str(WORK / "result.json"))
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from forgetting_ray.config import PipelineConfig
    from forgetting_ray.models import resolve_model_path
    from forgetting_ray.cluster.session import worker_env
    from forgetting_ray.stages.prepare import run_prepare
    from forgetting_ray.stages.score import run_score

    base_cfg = smollm2_scoring_config(WORK / "run", args.samples, 512, args.shard_size, 4096, num_cpus_per_actor=1)
    prep = run_prepare(PipelineConfig.model_validate(base_cfg))
    export = build_reference(resolve_model_path(PipelineConfig.model_validate(base_cfg).model), WORK / "export")

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    runs: dict[int, dict] = {}
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": worker_env()})
        for nodes in (1, 2):
            cluster.add_node(num_cpus=NODE_CPUS)
            cluster.wait_for_nodes()
            run_dir = WORK / f"score_{nodes}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = PipelineConfig.model_validate({**base_cfg, "run_dir": str(run_dir),
                                                 "scoring": {**base_cfg["scoring"], "concurrency": nodes}})
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            res = run_score(cfg, prep.train_path, export)
            runs[nodes] = {**res.stats, "call_s": time.perf_counter() - t0, "actor_nodes": len(set(res.nodes)),
                           "load_before": load}
            print(f"# {nodes} worker node(s): {json.dumps(runs[nodes])}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()

    one, two = runs[1], runs[2]
    compute = {n: r["score_s"] - r["first_result_s"] for n, r in runs.items()}
    startup = {n: r["call_s"] - compute[n] for n, r in runs.items()}
    result = {"samples": args.samples, "cores": os.cpu_count(), "runs": runs,
              "compute_s": compute, "startup_s": startup,
              "speedup_compute": compute[1] / compute[2], "speedup_call": one["call_s"] / two["call_s"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nSmolLM2-135M, fp32 CPU, {args.samples} FLAN CoT rows, {os.cpu_count()} physical cores, worker nodes of "
          f"{NODE_CPUS} CPUs, one 1-CPU actor per node\n")
    print("| | 1 worker node | 2 worker nodes | 2 / 1 |\n|---|---|---|---|")
    print(f"| nodes the actors ran on | {one['actor_nodes']} | {two['actor_nodes']} | |")
    print(f"| whole stage call (s) | {one['call_s']:.1f} | {two['call_s']:.1f} | {result['speedup_call']:.2f}x |")
    print(f"| fixed start-up, to the first scored batch (s) | {startup[1]:.1f} | {startup[2]:.1f} | |")
    print(f"| compute part, after the first batch (s) | {compute[1]:.1f} | {compute[2]:.1f} | "
          f"**{result['speedup_compute']:.2f}x** (goal >= 1.8x) |")
    print(f"| load average before the run | {one['load_before']:.1f} | {two['load_before']:.1f} | |")


if __name__ == "__main__":
    main()
