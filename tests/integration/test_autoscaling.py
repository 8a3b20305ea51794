"""`ray up cluster.yaml` as a user meets it, on one machine: Ray's own autoscaler (its fake multi-node provider,
which starts raylets on this host instead of VMs) with cluster.yaml's worker node types (same names and
max_workers, 2 CPUs each, their GPUs as logical resources that the CPU stands in for), a head without CPUs,
no worker node at the start, and a bucket on a local S3 server as the only shared storage.

Checked: `ray job submit` of the tiny pipeline, as the README writes it plus a runtime env that hands the job
its storage settings, succeeds with exports equal to a local run's: the stage's pre-flight check reads the
autoscaler's node types, asks for the nodes and waits for them instead of refusing the head-only cluster. A
Tune search of two concurrent trials gets two worker nodes. With nothing left to run, the autoscaler takes
the cluster back to zero worker nodes within its idle timeout + 60 s.

Only the processes this test started are stopped: the head's process group, then whatever still runs under
this test's own Ray temp dir (the fake nodes the autoscaler started), never `ray stop`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import psutil
import pytest
import yaml

from .multinode import REPO, BIN, MultinodeCluster, _answers, _env, _start, _started, _stop, _wait_until, head_node_cmd

if TYPE_CHECKING:
    from .conftest import CloneRun
    from .multinode import S3Server

pytest_plugins = [f"{__package__}.multinode"]

IDLE_TIMEOUT_MIN = 0.5
FAKE_NODE_CPUS = 2
# the clone_run fixture's settings: the exports must equal that local run's
SMALL = ["reference.max_steps=3", "training.max_steps=3", "baselines=[]", "eval_base_model=false", "eval.limit=3"]


def fake_autoscaler_config(cluster_yaml: Path, gcs_address: str) -> dict:
    """cluster.yaml's worker node types for Ray's fake provider: names, min/max workers and custom resources
    kept, each node FAKE_NODE_CPUS CPUs (GPUs stay logical); the head is the provider's own type, 0 CPUs."""
    real = yaml.safe_load(cluster_yaml.read_text())
    head = real["head_node_type"]
    types = {"ray.head.default": {"resources": {"CPU": 0}, "max_workers": 0, "node_config": {}}}
    for name, spec in real["available_node_types"].items():
        if name == head:
            continue
        resources = {**spec["resources"], "CPU": FAKE_NODE_CPUS}
        types[name] = {"resources": resources, "min_workers": spec.get("min_workers", 0),
                       "max_workers": min(spec["max_workers"], 2), "node_config": {}}
    return {
        "cluster_name": "fake-" + real["cluster_name"], "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": types, "head_node_type": "ray.head.default",
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "auth": {},
    }


def _stop_what_runs_under(root: Path) -> None:
    """SIGKILL every process of this user whose command line names ``root`` (the fake nodes' raylets and
    workers: the autoscaler starts them outside the head's process group)."""
    mine = os.getuid()
    for proc in psutil.process_iter(["cmdline", "uids"]):
        try:
            if proc.info["uids"].real == mine and any(str(root) in a for a in proc.info["cmdline"] or []):
                proc.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


@pytest.fixture(scope="module")
def autoscaling_cluster() -> Iterator[MultinodeCluster]:
    root = Path(tempfile.mkdtemp(prefix="fras", dir="/tmp"))  # short: Ray's unix socket paths are length-limited
    cmd, dashboard, gcs_address = head_node_cmd(root / "t")
    cluster = MultinodeCluster(address=dashboard, gcs_address=gcs_address, head_cache=root / "head-cache",
                               worker_caches=[])
    cluster.head_cache.mkdir()
    config = root / "autoscaler.yaml"
    config.write_text(yaml.safe_dump(fake_autoscaler_config(REPO / "cluster.yaml", cluster.gcs_address)))
    # the fake nodes' temp dirs follow RAY_TMPDIR: under root, so that teardown can find them
    env = {k: v for k, v in _env().items() if k != "MLFLOW_TRACKING_URI"} | {
        "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_TMPDIR": str(root / "t"),
        "FORGETTING_RAY_CACHE": str(cluster.head_cache), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    log = root / "head.log"
    head = _start([*cmd, "--autoscaling-config", str(config)], env, log)
    try:
        _wait_until(lambda: _started(log) and _answers(f"{cluster.address}/api/version"), head, log, "ray head", 120)
        (cluster.head_node_id,) = cluster.alive()
        yield cluster
    finally:
        _stop(head)
        _stop_what_runs_under(root)
        shutil.rmtree(root, ignore_errors=True)


def _export_weights(manifests: dict[str, bytes]) -> dict[str, dict[str, str]]:
    """stage -> {weights file: sha256} of every export manifest (the model cards and adapter configs name
    where the base model was loaded from, which differs between a bucket and a local folder)."""
    return {stage: {f: h for f, h in json.loads(raw)["files"].items() if f.endswith(".safetensors")}
            for stage, raw in manifests.items()}


@pytest.mark.timeout(1800)
def test_a_cluster_from_zero_workers_runs_the_submitted_job_and_scales_back(
        autoscaling_cluster: MultinodeCluster, s3_server: "S3Server", clone_run: "CloneRun"):
    cluster, s3 = autoscaling_cluster, s3_server
    assert cluster.alive() == {cluster.head_node_id}  # nothing but a head without CPUs
    run_dir = f"s3://{s3.bucket}/runs/autoscaled"
    args = ["--config", "examples/demo.yaml", "--tiny", f"run_dir={run_dir}", *SMALL]

    # the README's submit line, with the job's storage settings in its runtime env
    status, logs = cluster.submit([sys.executable, "jobs/pipeline.py", *args], env_vars=s3.env, timeout_s=1200)
    assert status == "SUCCEEDED", logs[-8000:]
    assert re.search(r"waiting for \d+ x \{CPU: [\d.]+\} \(training workers\) -- the autoscaler needs 1 gpu_", logs)
    assert "the cluster holds" in logs and "Traceback" not in logs
    assert len(cluster.node_ids()) > 1  # the autoscaler added worker nodes

    # the same weights as the local run of the same settings
    local = {stage: (next((clone_run.run_dir / stage).glob("*/export/manifest.json"))).read_bytes()
             for stage in ("reference", "train")}
    remote = {stage: s3.read(next(k for k in s3.list(f"runs/autoscaled/{stage}/")
                                  if k.endswith("/export/manifest.json")))
              for stage in ("reference", "train")}
    weights = _export_weights(local)
    assert all(weights.values()) and _export_weights(remote) == weights

    # two concurrent trials: one more node than one trial needs
    tune = [sys.executable, "jobs/tune.py", *args, "tune.enabled=true", "tune.num_samples=2", "tune.scheduler=fifo",
            "tune.objective=val_nll", "tune.max_concurrent_trials=2", "tune.report_every=4"]
    job = cluster.start(tune, env_vars=s3.env)
    most_workers, deadline = 0, time.monotonic() + 1200
    while time.monotonic() < deadline:
        status, logs = cluster.wait(job, timeout_s=0.1) if _ended(cluster, job) else ("", "")
        if status:
            break
        most_workers = max(most_workers, len(cluster.alive()) - 1)
        time.sleep(5)
    assert status == "SUCCEEDED", logs[-8000:]
    (result_key,) = [k for k in s3.list("runs/autoscaled/tune/") if re.fullmatch(r"runs/autoscaled/tune/\w+/result\.json", k)]
    trials = json.loads(s3.read(result_key))["trials"]
    assert [t["status"] for t in trials] == ["finished", "finished"]
    assert most_workers >= 2, most_workers

    # nothing left to run: back to the head alone within the idle timeout + 60 s
    deadline = time.monotonic() + IDLE_TIMEOUT_MIN * 60 + 60
    while cluster.alive() != {cluster.head_node_id}:
        assert time.monotonic() < deadline, f"worker nodes still up:\n{_what_holds(cluster)}"
        time.sleep(5)


_HOLDERS_PY = """
import sys
from ray.util.state import list_actors, list_placement_groups
print([(a.class_name, a.node_id[-5:]) for a in list_actors(address=sys.argv[1], filters=[("state", "=", "ALIVE")])])
print([(p.placement_group_id[-6:], p.state) for p in list_placement_groups(address=sys.argv[1]) if p.state != "REMOVED"])
"""


def _what_holds(cluster: MultinodeCluster) -> str:
    """The alive actors and placement groups, and `ray status -v`: what keeps a node from idling out."""
    import subprocess

    actors = subprocess.run([sys.executable, "-c", _HOLDERS_PY, cluster.address], env=_env(), capture_output=True,
                            text=True, timeout=60)
    status = subprocess.run([str(BIN / "ray"), "status", "-v", "--address", cluster.gcs_address], env=_env(),
                            capture_output=True, text=True, timeout=60)
    return f"{actors.stdout}{actors.stderr[-2000:]}\n{status.stdout[-4000:]}"


def _ended(cluster: MultinodeCluster, job_id: str) -> bool:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.address).get_job_status(job_id).is_terminal()
