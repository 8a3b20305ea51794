"""Benchmark: the tiny pipeline on one local node against three nodes sharing only a bucket, in one run, in turn.

The configurations of the multi-node cluster test (``tests/integration/test_cluster_path.py``), timed side by side:

- **one node**: ``forgetting-ray run`` with a local Ray of 2 CPUs, ``run_dir`` on local disk;
- **three nodes**: a ``ray.cluster_utils.Cluster`` whose head has no CPUs and whose two worker nodes have one CPU
  and a cache folder each (nothing shared but the bucket), ``run_dir`` in a bucket on a local S3 server (moto);
  the driver joins it through ``RAY_ADDRESS`` and keeps its own cache.

Both run ``examples/demo.yaml --tiny scoring.concurrency=1 eval.concurrency=1 eval.limit=8`` from scratch (a new
run_dir and new caches each time) with MLflow in a sqlite store, ``--repeats`` times, one node then three nodes
in each repeat.  Per stage, the time the pipeline reports (``stage timings``); the three-node / one-node ratios
are paired within a repeat.  Cluster start-up is outside the stage timings.

``--footer-actors-baseline 32`` adds, in each repeat, a third run: three nodes with Ray Data's own default of 32
parquet footer actors per read against the product as built (one actor per read when this was measured), the two three-node
runs in alternating order.

Usage: ``python bench/bench_cluster_path.py [--repeats 2]`` (about 20 minutes on 2 idle cores); writes ``--out``
(default bench/results/cluster_path.json); ``--report FILE`` prints the table again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORK = REPO / ".cache" / "bench_cluster_path"
BUCKET = "forgetting-ray-bench"
PIPELINE = ["examples/demo.yaml", "--tiny", "scoring.concurrency=1", "eval.concurrency=1",
            "eval.limit=8"]
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}
TIMINGS = re.compile(r"^stage timings: (.*)$", re.M)
FOOTER_BASELINE = "three_nodes_ray_footer_actors"


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def report(res: dict) -> None:
    reps = res["repeats"]
    print(f"\n{res['date']}, {res['cores']} cores, `{res['command']}`: tiny pipeline, {len(reps)} repeats (one node, "
          f"then three nodes, in each); seconds as the pipeline reports them, median [min, max] over the repeats; "
          f"the ratio is paired within a repeat\n")
    print("| stage | one node, local disk (s) | three nodes, bucket (s) | three / one, paired |\n|---|---|---|---|")
    for stage in reps[0]["one_node"]:
        one = [r["one_node"][stage] for r in reps]
        three = [r["three_nodes"][stage] for r in reps]
        ratios = [b / a for a, b in zip(one, three)]
        print(f"| {stage} | {spread(one, '.1f')} | {spread(three, '.1f')} | {spread(ratios, '.2f')}x |")
    one = [sum(r["one_node"].values()) for r in reps]
    three = [sum(r["three_nodes"].values()) for r in reps]
    print(f"| all stages | {spread(one, '.1f')} | {spread(three, '.1f')} | "
          f"**{spread([b / a for a, b in zip(one, three)], '.2f')}x** |")
    if all(FOOTER_BASELINE in r for r in reps):
        print(f"\nThe score stage on three nodes with Ray Data's default {res['footer_actors_baseline']} parquet footer "
              "actors per read (set in the driver's environment, which the product keeps) against the product's one, "
              "in the same repeats (the two three-node runs in alternating order):\n")
        print("| stage | three nodes, product (s) | three nodes, Ray's footer actors (s) | Ray's / product's, paired |"
              "\n|---|---|---|---|")
        for stage in ("score", "all stages"):
            def seconds(r: dict) -> float:
                return r[stage] if stage in r else sum(r.values())

            ours = [seconds(r["three_nodes"]) for r in reps]
            ray_default = [seconds(r[FOOTER_BASELINE]) for r in reps]
            print(f"| {stage} | {spread(ours, '.1f')} | {spread(ray_default, '.1f')} | "
                  f"{spread([b / a for a, b in zip(ours, ray_default)], '.2f')}x |")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pipeline(args: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """``forgetting-ray run`` in a child process; the stage timings it prints (seconds by stage)."""
    out = subprocess.run([str(BIN / "forgetting-ray"), "run", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=3600)
    log.write_text(out.stdout + out.stderr)
    found = TIMINGS.findall(out.stdout)
    if out.returncode or not found:
        sys.exit(f"the pipeline failed (exit {out.returncode}); its output: {log}")
    return {k: float(v.rstrip("s")) for k, v in (part.rsplit(" ", 1) for part in found[-1].split(", "))}


def one_node(rep: int, base_env: dict[str, str]) -> dict[str, float]:
    folder = WORK / f"one-{rep}"
    folder.mkdir()
    env = {**base_env, "FORGETTING_RAY_CACHE": str(folder / "cache")}
    return run_pipeline([*PIPELINE, f"run_dir={folder / 'run'}", f"tracking.tracking_uri=sqlite:///{folder}/mlflow.db"],
                        env, folder / "pipeline.log")


def three_nodes(rep: int, base_env: dict[str, str], endpoint: str, name: str = "three") -> dict[str, float]:
    from ray.cluster_utils import Cluster

    folder = WORK / f"{name}-{rep}"
    folder.mkdir()
    s3 = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    os.environ.update(s3)  # the nodes' raylets (and so their workers) start with this process's environment
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "dashboard_host": "127.0.0.1"})
    try:
        for i in range(2):
            cluster.add_node(num_cpus=1, env_vars={"FORGETTING_RAY_CACHE": str(folder / f"node{i}-cache")})
        cluster.wait_for_nodes()
        env = {**base_env, **s3, "RAY_ADDRESS": cluster.address, "FORGETTING_RAY_CACHE": str(folder / "head-cache")}
        return run_pipeline([*PIPELINE, f"run_dir=s3://{BUCKET}/runs/{name}-rep{rep}",
                             f"tracking.tracking_uri=sqlite:///{folder}/mlflow.db"], env, folder / "pipeline.log")
    finally:
        cluster.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2, help="pairs of runs (one node, then three nodes)")
    ap.add_argument("--out", default=str(REPO / "bench/results/cluster_path.json"), help="raw figures (JSON)")
    ap.add_argument("--report", metavar="FILE", help="print the table from raw figures written earlier and exit")
    ap.add_argument("--footer-actors-baseline", type=int, default=0, metavar="N",
                    help="also run three nodes with RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=N (Ray's default: 32) in "
                         "each repeat, against the product's one footer actor per read")
    args = ap.parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return

    import boto3
    from moto.server import ThreadedMotoServer

    from forgetting_ray.store import atomic_write_text

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    base_env.pop("RAY_ADDRESS", None)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    res = {"date": str(date.today()), "cores": os.cpu_count(),
           "command": "python bench/bench_cluster_path.py " + " ".join(sys.argv[1:]), "repeats": [],
           "footer_actors_baseline": args.footer_actors_baseline}
    try:
        for rep in range(args.repeats):
            t = time.monotonic()
            rec = {"one_node": one_node(rep, base_env)}
            variants = [("three_nodes", base_env)]
            if args.footer_actors_baseline:
                variants.append((FOOTER_BASELINE, {**base_env, "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS":
                                                   str(args.footer_actors_baseline)}))
            for key, env in variants[::-1] if rep % 2 else variants:
                rec[key] = three_nodes(rep, env, endpoint, name=key)
            res["repeats"].append(rec)
            print(f"# repeat {rep}: {json.dumps(rec)} ({time.monotonic() - t:.0f} s)", flush=True)
    finally:
        server.stop()
    atomic_write_text(args.out, json.dumps(res, indent=2) + "\n")
    report(res)


if __name__ == "__main__":
    main()
