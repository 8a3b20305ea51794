"""Benchmark: the SCORE stage on one Ray worker node against two, in one run, alternating.

A multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head without CPUs, two worker nodes
of 2 CPUs each, each its own raylet and object store), SmolLM2-135M with a random LoRA reference as in
``bench_scoring.py``.  After one discarded warm-up pass of two actors (both nodes load the model once, so
neither configuration meets cold caches), the same rows are scored ``--repeats`` times with one 1-CPU actor
(one node scores) and with two (one per node, or both on one node: the table says where they ran), in turn.
Reported per configuration: the whole stage call and the steady-state throughput (tokens/s while every actor
scores, counting only blocks computed wholly inside that window:
:func:`forgetting_ray.stages.score.steady_throughput`, at most 2x for two actors no faster than one), and
the 2 / 1 ratios paired within a repeat (goal >= 1.8x in steady state).

On a machine with fewer physical cores than the nodes declare, the ratio measures the machine's contention
rather than the stage: the table prints the core count and the load average beside it.

Usage: ``python bench/bench_score_nodes.py [--samples 64] [--repeats 2]`` (about 8 minutes on 2 idle cores);
writes ``--out`` (default bench/results/score_nodes.json); ``--report FILE`` prints the table again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scoring import build_reference, smollm2_scoring_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAN = float("nan")  # a run too short for a steady state (fewer than two blocks per actor)
WORK = REPO / ".cache" / "bench_score_nodes"
NODE_CPUS = 2


def report(result: dict) -> None:
    reps = result["repeats"]

    def med(n: str, key: str) -> str:
        vals = [r[n][key] for r in reps]
        return f"{statistics.median(vals):.1f} [{min(vals):.1f}, {max(vals):.1f}]"

    def ratio(key: str) -> str:
        vals = [r["ratios"][key] for r in reps]
        return f"**{statistics.median(vals):.2f}x** [{min(vals):.2f}, {max(vals):.2f}]"

    print(f"\nSmolLM2-135M, fp32 CPU, {result['samples']} FLAN CoT rows, {result['cores']} physical cores, worker nodes "
          f"of {NODE_CPUS} CPUs, 1-CPU actors, {len(reps)} repeats (1 node, 2 nodes in turn, after a warm-up pass), "
          f"{result['date']}; `{result['command']}`\n")
    print("| median [min, max] over repeats | 1 node (1 actor) | 2 nodes (2 actors) | 2 / 1, paired |\n|---|---|---|---|")
    nodes = lambda n: sorted({r[n]["actor_nodes"] for r in reps})  # noqa: E731
    print(f"| nodes the actors ran on | {nodes('one')} | {nodes('two')} | |")
    print(f"| whole stage call (s) | {med('one', 'call_s')} | {med('two', 'call_s')} | {ratio('call')} |")
    print(f"| steady-state tokens/s | {med('one', 'steady_tokens_per_s')} | {med('two', 'steady_tokens_per_s')} | "
          f"{ratio('steady')} (goal >= 1.8x) |")
    print(f"| load average before the run | {med('one', 'load_before')} | {med('two', 'load_before')} | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64, help="training rows to score")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of 1 node then 2 nodes")
    ap.add_argument("--shard-size", type=int, default=4, help="rows per block (several per actor)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "score_nodes.json"))
    ap.add_argument("--report", metavar="FILE", help="print the table of an earlier run's raw figures and stop")
    args = ap.parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return

    import ray
    from ray.cluster_utils import Cluster

    from forgetting_ray.cluster.session import worker_env
    from forgetting_ray.config import PipelineConfig
    from forgetting_ray.models import resolve_model_path
    from forgetting_ray.stages.prepare import run_prepare
    from forgetting_ray.stages.score import run_score

    base_cfg = smollm2_scoring_config(WORK / "run", args.samples, 512, args.shard_size, 4096, num_cpus_per_actor=1)
    prep = run_prepare(PipelineConfig.model_validate(base_cfg))
    export = build_reference(resolve_model_path(PipelineConfig.model_validate(base_cfg).model), WORK / "export")

    def score(actors: int) -> dict:
        run_dir = WORK / f"score_{actors}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = PipelineConfig.model_validate({**base_cfg, "run_dir": str(run_dir),
                                             "scoring": {**base_cfg["scoring"], "concurrency": actors}})
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        res = run_score(cfg, prep.train_path, export)
        return {**res.stats, "call_s": time.perf_counter() - t0, "actor_nodes": len(set(res.nodes)), "load_before": load}

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    repeats = []
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=NODE_CPUS)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": worker_env()})
        score(2)  # warm-up: both nodes read the model once
        for r in range(args.repeats):
            rep = {"one": score(1), "two": score(2)}
            rep["ratios"] = {"call": rep["one"]["call_s"] / rep["two"]["call_s"],
                             "steady": rep["two"].get("steady_tokens_per_s", NAN) / rep["one"].get("steady_tokens_per_s", NAN)}
            print(f"# repeat {r + 1}: {json.dumps(rep['ratios'])}", flush=True)
            repeats.append(rep)
    finally:
        ray.shutdown()
        cluster.shutdown()

    result = {"date": date.today().isoformat(), "command": "python bench/bench_score_nodes.py " + " ".join(sys.argv[1:]),
              "samples": args.samples, "cores": os.cpu_count(), "repeats": repeats}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    report(result)


if __name__ == "__main__":
    main()
