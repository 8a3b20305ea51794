"""A new user's cluster path: `ray start --head` on 127.0.0.1, `ray job submit` of the tiny pipeline
with the Ray CLI, wait for SUCCEEDED, check the outputs; a second submission reuses every stage.

The head gets its own ports and temp dir so it cannot collide with the session's `ray_cluster`, and
it is stopped by ending its `ray start --block` process (never `ray stop`, which stops every cluster
on the machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow
import pytest

from .multinode import BIN, REPO, _env, _free_ports


@pytest.fixture(scope="module")
def head():
    gcs, dash, client, agent_http, agent_grpc, metrics, rt_env = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="frj", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rt_env), "--num-cpus", "2",
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    from forgetting_ray.submit import SubmitError, check_address

    deadline = time.monotonic() + 120
    while True:
        try:
            check_address(address, timeout_s=2)
            break
        except SubmitError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"ray start --head did not come up:\n{proc.stdout.read()}")
            time.sleep(1)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)  # --block tears the head's processes down with it
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, run_dir: Path) -> str:
    # the job runs in a copy of the working dir, which carries the corpus and the benchmark files
    overrides = [f"run_dir={run_dir}", "eval.limit=6", "reference.max_steps=4", "training.max_steps=4"]
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
           "--runtime-env-json", json.dumps({"excludes": [".git", ".venv", "runs", ".cache"]}),
           "--", "python", "jobs/pipeline.py", "--config", "examples/demo.yaml", "--tiny", *overrides]
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    job_id = re.search(r"Job '(raysubmit_\w+)'", log)[1]
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(address).get_job_status(job_id) == JobStatus.SUCCEEDED
    return log


def test_tiny_pipeline_job_succeeds_and_resumes(head, tmp_path):
    run_dir = tmp_path / "run"
    log = _submit(head, run_dir)

    # the job's own output: the comparison table and the MLflow command
    assert "| model | asdiv | boolq | logiqa | truthfulqa | tydiqa | mean |" in log
    for row in ("| base |", "| sft |", "| forgetting |"):
        assert row in log
    assert f"mlflow ui --backend-store-uri sqlite:///{run_dir}/mlflow.db" in log

    # the outputs on disk: every stage complete, exports validated, eval results per model
    for stage in ("prepare", "score", "partition"):
        assert any((d / "_SUCCESS.json").is_file() for d in (run_dir / stage).iterdir()), stage
    exports = sorted(run_dir.glob("train/*/export/manifest.json"))
    assert len(exports) == 2 and all((m.parent / "merged" / "model.safetensors").is_file() for m in exports)
    results = {p.parent.name.split("-")[0]: json.loads(p.read_text()) for p in run_dir.glob("eval/*/results.json")}
    assert set(results) == {"base", "sft", "forgetting"}
    assert all(r["tasks"]["boolq"]["n"] == 6 for r in results.values())

    # MLflow: one parent run, a child per stage
    client = mlflow.MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    names = {r.info.run_name for r in runs}
    assert {"pipeline", "prepare", "reference", "score", "partition", "train", "train-sft", "eval"} <= names

    # the audit page of that run, from the run folder alone (the tokenizer is the one the run scored with)
    from forgetting_ray.cli import main

    page = tmp_path / "audit.html"
    assert main(["report", str(run_dir), "--out", str(page), "--n-random", "3"]) == 0
    html = page.read_text()
    assert "FORGETTING partition audit" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", html)  # no network asset

    # a second submission finds every stage's output and recomputes nothing
    again = _submit(head, run_dir)
    assert "is complete for these inputs; reusing it" in again  # prepare
    assert "reference stage" in again and again.count("already complete in") == 3  # reference, train, train-sft
    assert "reusing cached scores" in again
    assert "partition: reusing" in again
    assert again.count("eval: reusing") == 3
    assert "Starting execution of Dataset" not in again  # no Ray Data pass: nothing was scored or evaluated
