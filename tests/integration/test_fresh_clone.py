"""A user's clone has nothing beside it: copy the repository's files into an empty folder and run the tiny
pipeline there, through evaluation on the benchmark files the package ships.

The copy is what `git clone` would hold (tracked files, plus files not yet committed that git does not
ignore), under a parent folder that holds nothing else, so a path that escapes the repository fails here
as it would for a user. The installed virtualenv is reused; PYTHONPATH puts the copy's package first in
the driver and, through Ray's worker environment, in every worker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import FAST_TRAIN_POLL

REPO = Path(__file__).resolve().parents[2]
# Directories a repository text may point at that a user's clone does not have (spelt in two pieces so
# that this file does not match its own check).
OUTSIDE = ("../" + "shared", 'parent / "' + 'shared"')
CHECKED = ("forgetting_ray", "examples", "jobs", "tests", "bench", "Makefile", "README.md", "cluster.yaml", "docs")


def repository_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


def test_no_file_of_the_project_points_outside_the_repository():
    offenders = []
    for rel in repository_files():
        if not rel.startswith(CHECKED):
            continue
        try:
            text = (REPO / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        offenders += [f"{rel}: {needle}" for needle in OUTSIDE if needle in text]
    assert not offenders


def test_tiny_pipeline_runs_through_evaluation_in_a_clone_with_nothing_beside_it(tmp_path):
    clone = tmp_path / "fresh" / "forgetting-ray"
    for rel in repository_files():
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, clone / rel)
    assert sorted(os.listdir(clone.parent)) == ["forgetting-ray"]

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(clone), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true", TOKENIZERS_PARALLELISM="false",
               **FAST_TRAIN_POLL)
    where = subprocess.run([sys.executable, "-c", "import forgetting_ray; print(forgetting_ray.__file__)"],
                           cwd=clone, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(clone)

    run_dir = clone / "runs" / "tiny"
    cmd = [sys.executable, "-m", "forgetting_ray.cli", "run", "examples/demo.yaml", "--tiny", f"run_dir={run_dir}",
           "reference.max_steps=3", "training.max_steps=3", "baselines=[]", "eval_base_model=false", "eval.limit=3",
           ]
    proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    [results] = run_dir.glob("eval/forgetting-*/results.json")
    tasks = json.loads(results.read_text())["tasks"]
    assert set(tasks) == {"truthfulqa", "boolq", "logiqa", "tydiqa", "asdiv"}
    assert all(t["n"] == 3 for t in tasks.values())
    assert "| forgetting |" in log
    # the console: a line per stage start and end, progress bars, the table; no warning, traceback or worker
    # output (those are in the run's log file)
    lines = proc.stdout.split("\n") + proc.stderr.split("\n")  # \r-updated progress bars count once
    assert len(lines) <= 60, log
    assert not re.search(r"Warning|Traceback|\(\w+ pid=\d+\)|View run", log), log
    for stage in ("prepare", "reference", "score", "partition", "train", "eval"):
        assert re.search(rf"== {stage}( \(.+\))?\n", proc.stderr) and re.search(rf"== {stage} done in [\d.]+ s", proc.stderr), stage
    assert re.search(r"train \w+: 100%.*loss=", proc.stderr)  # the optimizer-step bar
    driver_log = (run_dir / "logs" / "driver.log").read_text()
    assert "ray" in driver_log and "== train" in driver_log
    # the workers' own output (those that wrote any), copied from Ray's session logs into the run
    worker_logs = [p.name for p in (run_dir / "logs" / "workers").glob("*/*")]
    assert any("ScoreActor" in n for n in worker_logs) and any("RayTrainWorker" in n for n in worker_logs), worker_logs
    assert re.search(r"eval forgetting-\w+: 100%", proc.stderr)  # the requests bar
    assert f"mlflow ui --backend-store-uri sqlite:///{run_dir}/mlflow.db" in log
    for stage in ("prepare", "score", "partition"):
        assert any((d / "_SUCCESS.json").is_file() for d in (run_dir / stage).iterdir()), stage

    # the audit page of that run, from the run folder alone (the tokenizer is the one the run scored with)
    page = tmp_path / "audit.html"
    proc = subprocess.run([sys.executable, "-m", "forgetting_ray.cli", "report", str(run_dir), "--out", str(page),
                           "--n-random", "3"], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    html = page.read_text()
    assert "FORGETTING partition audit" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", html)  # no network asset

    # `reproduce`: the same run again from its run card, into a new folder; every stage's hashes match
    again = run_dir.parent / "tiny-again"
    proc = subprocess.run([sys.executable, "-m", "forgetting_ray.cli", "reproduce", str(run_dir), "--into", str(again)],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "inputs: the same packages, base model, Python and seeds" in out
    table = [line for line in out.splitlines() if line.startswith("| ") and line.endswith(" |")][1:]
    stages = {line.split(" | ")[0].strip("| ") for line in table}
    assert {"prepare", "reference", "score", "partition", "train", "eval"} <= stages, out[-3000:]
    assert all(line.endswith("| yes |") for line in table) and "hashes matches" in out
    assert (again / "run_card.json").is_file() and not (again / "tiny_model").exists()  # the original's model
