"""A user's clone has nothing beside it: the session's tiny pipeline run (``clone_run`` in conftest.py) is
made in a copy of the repository, alone in its folder, by the package installed from that copy, through
evaluation on the benchmark files the package ships. A path that escapes the repository, or a file the
wheel does not ship, fails here as it would for a user. These tests read that run: its console, its
outputs, its audit page, and `reproduce` of it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import REPO, CloneRun, repository_files

# Directories a repository text may point at that a user's clone does not have (spelt in two pieces so
# that this file does not match its own check).
OUTSIDE = ("../" + "shared", 'parent / "' + 'shared"')
CHECKED = ("forgetting_ray", "examples", "jobs", "tests", "bench", "Makefile", "README.md", "cluster.yaml", "docs")


def test_no_file_of_the_project_points_outside_the_repository():
    offenders = []
    for rel in repository_files():
        if not rel.startswith(CHECKED):
            continue
        try:
            text = (Path(REPO) / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        offenders += [f"{rel}: {needle}" for needle in OUTSIDE if needle in text]
    assert not offenders


def test_the_run_used_the_package_installed_from_the_clone(clone_run: CloneRun):
    assert sorted(os.listdir(clone_run.clone.parent)) == ["forgetting-ray"]
    where = subprocess.run([sys.executable, "-P", "-c", "import forgetting_ray; print(forgetting_ray.__file__)"],
                           cwd=clone_run.clone, env=clone_run.env, capture_output=True, text=True,
                           check=True).stdout.strip()
    assert Path(where).is_relative_to(clone_run.site)
    shipped = {p.parent.name for p in clone_run.site.glob("forgetting_ray/eval/data/*/README.md")}
    assert shipped == {"asdiv", "boolq", "logiqa", "truthfulqa", "tydiqa"}  # the benchmarks ship in the wheel


def test_tiny_pipeline_runs_through_evaluation(clone_run: CloneRun):
    run_dir = clone_run.run_dir
    [results] = run_dir.glob("eval/forgetting-*/results.json")
    tasks = json.loads(results.read_text())["tasks"]
    assert set(tasks) == {"truthfulqa", "boolq", "logiqa", "tydiqa", "asdiv"}
    assert all(t["n"] == 3 for t in tasks.values())
    for stage in ("prepare", "score", "partition"):
        assert any((d / "_SUCCESS.json").is_file() for d in (run_dir / stage).iterdir()), stage


def test_the_console_shows_stages_bars_and_the_table_and_the_logs_keep_the_rest(clone_run: CloneRun):
    out, err = clone_run.stdout, clone_run.stderr
    log = out + err
    assert "| forgetting |" in log
    # the console: a line per stage start and end, progress bars, the table; no warning, traceback or worker
    # output (those are in the run's log file)
    lines = out.split("\n") + err.split("\n")  # \r-updated progress bars count once
    assert len(lines) <= 60, log
    assert not re.search(r"Warning|Traceback|core_worker|\(\w+ pid=\d+\)|View run", log), log
    for stage in ("prepare", "reference", "score", "partition", "train", "eval"):
        assert re.search(rf"== {stage}( \(.+\))?\n", err) and re.search(rf"== {stage} done in [\d.]+ s", err), stage
    assert re.search(r"train \w+: 100%.*loss=", err)  # the optimizer-step bar
    assert re.search(r"eval forgetting-\w+: 100%", err)  # the requests bar
    run_dir = clone_run.run_dir
    assert f"mlflow ui --backend-store-uri sqlite:///{run_dir}/mlflow.db" in log
    assert "<td>forgetting</td>" in (run_dir / "report" / "results.html").read_text()  # the table, as a page
    driver_log = (run_dir / "logs" / "driver.log").read_text()
    assert "ray" in driver_log and "== train" in driver_log
    # the workers' own output (those that wrote any), copied from Ray's session logs into the run
    worker_logs = [p.name for p in (run_dir / "logs" / "workers").glob("*/*")]
    assert any("ScoreActor" in n for n in worker_logs) and any("RayTrainWorker" in n for n in worker_logs), worker_logs


def test_the_audit_page_comes_from_the_run_folder_alone(clone_run: CloneRun, tmp_path):
    # the tokenizer is the one the run scored with, found through the run folder
    page = tmp_path / "audit.html"
    proc = clone_run.cli("report", str(clone_run.run_dir), "--out", str(page), "--n-random", "3", timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    html = page.read_text()
    assert "FORGETTING partition audit" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", html)  # no network asset


def test_reproduce_reruns_the_run_card_and_every_hash_matches(clone_run: CloneRun):
    again = clone_run.run_dir.parent / "tiny-again"
    proc = clone_run.cli("reproduce", str(clone_run.run_dir), "--into", str(again))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "inputs: the same packages, base model, Python and seeds" in out
    table = [line for line in out.splitlines() if line.startswith("| ") and line.endswith(" |")][1:]
    stages = {line.split(" | ")[0].strip("| ") for line in table}
    assert {"prepare", "reference", "score", "partition", "train", "eval"} <= stages, out[-3000:]
    assert all(line.endswith("| yes |") for line in table) and "hashes matches" in out
    assert (again / "run_card.json").is_file() and not (again / "tiny_model").exists()  # the original's model
