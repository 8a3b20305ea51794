"""The cluster path as a user takes it (`ray job submit` of the tiny pipeline, then of a Tune search) on a
three-node cluster: a head without CPUs that runs the driver, two 1-CPU worker nodes with their own
node-local caches, a bucket on a local S3-compatible server as the only shared storage, and an MLflow
server that only the driver talks to.

Checked: the jobs succeed; every stage output is in the bucket and nothing is written where the job
runs (the head works in a mirror under its own cache); the score actors, the train workers and the
trials ran on the worker nodes (their node ids are recorded in the stage outputs and the run card);
MLflow holds the parent, stage and trial runs with per-step metrics; a resubmission through a fault proxy
that fails a fifth of the bucket requests reuses every stage from the bucket; a local run_dir that one
worker node cannot see is one `error:` line before any compute; killing the worker node that trains lets
Ray Train restart from the bucket checkpoint on the other node and finish with the weights of the
uninterrupted run.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from typing import TYPE_CHECKING

import mlflow
import pytest
from safetensors.torch import load as load_safetensors

from faultproxy import FaultProxy

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


@pytest.mark.timeout(3000)  # about 11 min alone on 2 cores; five jobs, each a full Ray job start-up
def test_pipeline_and_tune_on_three_nodes_with_a_bucket_and_mlflow_on_the_head(
        multinode_cluster: "MultinodeCluster", s3_server: "S3Server", mlflow_server: str):
    cluster, s3 = multinode_cluster, s3_server
    run_dir = f"s3://{s3.bucket}/runs/demo"
    args = ["--config", "examples/demo.yaml", "--tiny", f"run_dir={run_dir}",
            f"tracking.tracking_uri={mlflow_server}", "tracking.experiment_name=cluster-path",
            "tracking.register_as=forgetting-cluster", *FITS_TWO_ONE_CPU_NODES]
    pipeline = [sys.executable, "jobs/pipeline.py", *args]

    # a local run_dir that one worker node does not see: refused before any compute, naming the fix
    unseen = cluster.head_only / "run"
    status, logs = cluster.submit([sys.executable, "jobs/pipeline.py", "--config", "examples/demo.yaml", "--tiny",
                                   f"run_dir={unseen}"], timeout_s=300)
    assert status == "FAILED", logs[-4000:]
    assert f"error: run_dir {unseen} is a local folder that 1 of the 2 other Ray node(s) do not see" in logs
    assert "s3://" in logs and "Traceback" not in logs and not (unseen / "prepare").exists()

    # the job hands itself its storage settings, the ordinary way: the product must not set them again
    status, logs = cluster.submit(pipeline, env_vars=s3.env, timeout_s=1200)
    assert status == "SUCCEEDED", logs[-8000:]
    assert "| model | asdiv | boolq | logiqa | truthfulqa | tydiqa | mean [95 % CI] |" in logs  # the job's result table
    assert re.search(r"\| forgetting − sft \| [+−-]\d+\.\d\d \[", logs)  # and its paired difference from SFT
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
    answer = by_name["pipeline"].data.metrics  # the parent run carries the result: scores and the paired difference
    assert {"forgetting.mean", "sft.mean", "base.boolq", "forgetting-sft.mean", "forgetting-sft.p"} <= set(answer)
    assert answer["forgetting-sft.ci_low"] <= answer["forgetting-sft.mean"] <= answer["forgetting-sft.ci_high"]
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    steps = client.get_metric_history(by_name["train"].info.run_id, "loss")
    assert len(steps) >= 2 and len({m.step for m in steps}) == len(steps)
    # every export an MLflow model pointing at the bucket, its scores linked; the answer registered
    models = {m.name: m for m in client.search_logged_models([exp.experiment_id])}
    assert set(models) == {"reference", "sft", "forgetting"}, sorted(models)
    for name, card_name in (("sft", "train-sft"), ("forgetting", "train")):
        assert {"boolq", "tydiqa", "mean"} <= {m.key for m in models[name].metrics}
        assert models[name].tags["forgetting_ray.export_uri"] == card["models"][card_name]["uri"]
        assert models[name].tags["forgetting_ray.sha256"] == card["models"][card_name]["sha256"]
    [version] = client.search_model_versions("name = 'forgetting-cluster'")
    assert version.tags["forgetting_ray.sha256"] == card["models"]["train"]["sha256"]

    # a resubmission reuses every stage from the bucket, through a network that fails a fifth of its requests
    # (503 or a reset connection): retried, and nothing in the bucket changes
    with FaultProxy(s3.endpoint, fault_rate=0.2, seed=11) as proxy:
        status, logs = cluster.submit(pipeline, env_vars={**s3.env, "AWS_ENDPOINT_URL": proxy.url}, timeout_s=600)
    assert status == "SUCCEEDED", logs[-8000:]
    assert proxy.counts["503"] + proxy.counts["reset"] >= 3 and proxy.counts["forwarded"] >= 10, proxy.counts
    assert _stage_keys(s3, "runs/demo/") == done
    for stage, phrase in (("prepare", "reusing it"), ("reference", "already complete"), ("score", "reusing cached"),
                          ("partition", "reusing"), ("train", "already complete"), ("eval", "reusing")):
        assert re.search(rf"{stage}.*{phrase}", logs), (stage, logs[-6000:])
    assert "score: scored" not in logs
    assert len(client.search_logged_models([exp.experiment_id])) == 3  # the same exports: the same models
    assert len(client.search_model_versions("name = 'forgetting-cluster'")) == 1

    # a Tune search on the same scores: its trial on a worker node, its MLflow run written by the driver (searches
    # of several trials: tests/integration/test_tune.py)
    tune = [sys.executable, "jobs/tune.py", *args, "tune.enabled=true", "tune.num_samples=1",
            "tune.scheduler=fifo", "tune.objective=val_nll", "tune.max_concurrent_trials=1", "tune.report_every=4"]
    status, logs = cluster.submit(tune, timeout_s=1200)
    assert status == "SUCCEEDED", logs[-8000:]
    (result_key,) = [k for k in s3.list("runs/demo/tune/") if re.fullmatch(r"runs/demo/tune/\w+/result\.json", k)]
    result = json.loads(s3.read(result_key))
    assert [t["status"] for t in result["trials"]] == ["finished"]
    assert {t["node_id"] for t in result["trials"]} <= workers
    trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("forgetting_ray.stage") == "tune-trial"]
    assert len(trials) == 1 and all(r.info.status == "FINISHED" for r in trials)
    for r in trials:
        assert "val_nll" in r.data.metrics and "search.rho" in r.data.params
        assert len(client.get_metric_history(r.info.run_id, "loss")) >= 2  # per-step, as the trial ran

    # a worker node lost mid-fit: the train stage again (its bucket output removed, the scores reused); rank 0
    # holds after the step-4 checkpoint reached the bucket, and its node is killed
    key = card["models"]["train"]["key"]  # the pipeline's card (the Tune job wrote its own since)
    uninterrupted = load_safetensors(s3.read(f"runs/demo/train/{key}/export/merged/model.safetensors"))
    s3.delete(f"runs/demo/train/{key}/")
    s3.delete("runs/demo/ray_storage/train-")
    shutil.rmtree(mirrors[0] / "train" / key)
    held = cluster.head_cache.parent / "held-after-step-4"
    job = cluster.start([sys.executable, "jobs/pipeline.py", "--stage", "train", *args, "baselines=[]",
                         "training.checkpoint_every=4"],
                        {"FORGETTING_RAY_INJECT_FAULT": f"rank=0,after_step=4,marker={held},hold_s=600"})
    deadline = time.monotonic() + 600
    while not held.exists():
        assert time.monotonic() < deadline, cluster.wait(job, 1)[1][-6000:]
        time.sleep(1)
    victim = cluster.node_of("RayTrainWorker")
    assert victim in workers
    cluster.kill_node(victim)
    status, logs = cluster.wait(job, 900)
    assert status == "SUCCEEDED", logs[-8000:]
    failover_card = json.loads(s3.read("runs/demo/run_card.json"))
    assert failover_card["models"]["train"]["key"] == key and failover_card["models"]["train"]["nodes"] == list(workers - {victim})
    assert json.loads(s3.read(f"runs/demo/train/{key}/result.json"))["resumed_at"] == [4]
    resumed = load_safetensors(s3.read(f"runs/demo/train/{key}/export/merged/model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    diff = max((resumed[k].float() - uninterrupted[k].float()).abs().max().item() for k in resumed)
    print(f"fail-over: max |resumed - uninterrupted| = {diff:.3g}")
    assert diff <= 1e-6
