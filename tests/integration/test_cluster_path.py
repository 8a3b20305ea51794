"""The cluster path as a user takes it (`ray job submit` of the tiny pipeline, then of a Tune search) on a
three-node cluster: a head without CPUs that runs the driver, two 1-CPU worker nodes with their own
node-local caches, a bucket on a local S3-compatible server as the only shared storage, and an MLflow
server that only the driver talks to.

Checked: the jobs succeed; every stage output is in the bucket and nothing is written where the job
runs (the head works in a mirror under its own cache); the score actors, the train workers and the
trials ran on the worker nodes (their node ids are recorded in the stage outputs and the run card);
MLflow holds the parent, stage and trial runs with per-step metrics; a resubmission reuses every
stage from the bucket.
"""

from __future__ import annotations

import json
import re
import sys
from typing import TYPE_CHECKING

import mlflow
import pytest

if TYPE_CHECKING:  # the fixtures come in through pytest_plugins
    from .multinode import MultinodeCluster, S3Server

pytest_plugins = [f"{__package__}.multinode"]

STAGES = ("prepare", "reference", "score", "partition", "train", "eval")
# one 0.5-CPU actor per pool: on two 1-CPU nodes a second one would leave Ray Data no whole CPU
FITS_TWO_ONE_CPU_NODES = ["scoring.concurrency=1", "eval.concurrency=1", "eval.limit=8"]


def _stage_keys(s3: "S3Server", prefix: str) -> dict[str, set[str]]:
    keys = s3.list(prefix)
    return {stage: {k.split("/")[len(prefix.split("/"))] for k in keys if k.startswith(f"{prefix}{stage}/")
                    and k.endswith("/_SUCCESS.json")} for stage in ("prepare", "reference", "score", "partition",
                                                                     "train")}


@pytest.mark.timeout(2400)  # about 8.5 min alone on 2 cores; three jobs, each a full Ray job start-up
def test_pipeline_and_tune_on_three_nodes_with_a_bucket_and_mlflow_on_the_head(
        multinode_cluster: "MultinodeCluster", s3_server: "S3Server", mlflow_server: str):
    cluster, s3 = multinode_cluster, s3_server
    run_dir = f"s3://{s3.bucket}/runs/demo"
    args = ["--config", "examples/demo.yaml", "--tiny", f"run_dir={run_dir}",
            f"tracking.tracking_uri={mlflow_server}", "tracking.experiment_name=cluster-path",
            *FITS_TWO_ONE_CPU_NODES]
    pipeline = [sys.executable, "jobs/pipeline.py", *args]

    status, logs = cluster.submit(pipeline, timeout_s=1200)
    assert status == "SUCCEEDED", logs[-8000:]
    assert "| model | asdiv | boolq | logiqa | truthfulqa | tydiqa | mean |" in logs  # the job's comparison table
    for row in ("| base |", "| sft |", "| forgetting |"):
        assert row in logs

    # every stage in the bucket, each with its completion marker; the driver worked in the head's mirror
    done = _stage_keys(s3, "runs/demo/")
    assert all(len(done[s]) >= 1 for s in done), done
    keys = s3.list("runs/demo/")
    assert any(k.startswith("runs/demo/eval/") and k.endswith("/results.json") for k in keys)
    assert any(k.startswith("runs/demo/ray_storage/reference-") for k in keys)  # Ray Train checkpoints
    assert any(k.endswith("/export/manifest.json") for k in keys)
    assert "runs/demo/run_card.json" in keys and any(k.startswith("runs/demo/report/") for k in keys)
    mirrors = list((cluster.head_cache / "mirrors").iterdir())
    assert len(mirrors) == 1 and str(mirrors[0]) in logs
    assert not re.search(r"(?<![\w/])runs/demo/", logs.replace(run_dir, "")), "a local runs/demo path was used"

    # where the work ran: on the worker nodes, each fetching the models into its own cache
    card = json.loads(s3.read("runs/demo/run_card.json"))
    assert card["run_dir"] == run_dir and card["status"] == "FINISHED"
    workers = set(cluster.worker_node_ids)
    assert card["scores"]["nodes"] and set(card["scores"]["nodes"]) <= workers
    for name in ("reference", "train", "train-sft"):
        assert card["models"][name]["nodes"] and set(card["models"][name]["nodes"]) <= workers, card["models"]
        assert card["models"][name]["uri"].startswith(f"{run_dir}/")
    fetched = [c / "fetched" for c in cluster.worker_caches]
    assert any(f.is_dir() and any(f.iterdir()) for f in fetched)
    assert not (cluster.head_cache / "fetched").exists()  # the head loads no model for the workers

    # MLflow, written by the driver only: parent and stage runs, per-step training metrics
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("cluster-path")
    runs = client.search_runs([exp.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert {"pipeline", *STAGES[:-1], "train-sft"} <= set(by_name), sorted(by_name)
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    steps = client.get_metric_history(by_name["train"].info.run_id, "loss")
    assert len(steps) >= 2 and len({m.step for m in steps}) == len(steps)

    # a resubmission reuses every stage from the bucket
    status, logs = cluster.submit(pipeline, timeout_s=600)
    assert status == "SUCCEEDED", logs[-8000:]
    assert _stage_keys(s3, "runs/demo/") == done
    for stage, phrase in (("prepare", "reusing it"), ("reference", "already complete"), ("score", "reusing cached"),
                          ("partition", "reusing"), ("train", "already complete"), ("eval", "reusing")):
        assert re.search(rf"{stage}.*{phrase}", logs), (stage, logs[-6000:])
    assert "score: scored" not in logs

    # a Tune search on the same scores: trials on the worker nodes, their MLflow runs written by the driver
    tune = [sys.executable, "jobs/tune.py", *args, "tune.enabled=true", "tune.num_samples=2",
            "tune.scheduler=fifo", "tune.objective=val_nll", "tune.max_concurrent_trials=1", "tune.report_every=4"]
    status, logs = cluster.submit(tune, timeout_s=1200)
    assert status == "SUCCEEDED", logs[-8000:]
    (result_key,) = [k for k in s3.list("runs/demo/tune/") if re.fullmatch(r"runs/demo/tune/\w+/result\.json", k)]
    result = json.loads(s3.read(result_key))
    assert [t["status"] for t in result["trials"]] == ["finished", "finished"]
    assert {t["node_id"] for t in result["trials"]} <= workers
    trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("forgetting_ray.stage") == "tune-trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    for r in trials:
        assert "val_nll" in r.data.metrics and "search.rho" in r.data.params
        assert len(client.get_metric_history(r.info.run_id, "loss")) >= 2  # per-step, as the trial ran
