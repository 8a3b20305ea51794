"""The MLflow UI as a user opens it: a real `mlflow server` on a store our Tracker wrote (a pipeline run with
its stage runs and datasets), rendered by headless Chromium at the link a run prints.  MLflow 3.17 opens an
experiment on its GenAI overview ("Traces") unless told otherwise; the link opens the runs table, whose
Dataset column lists the splits.

Needs Debian's chromium (``apt-get install -y chromium``); CI installs it.
"""

from __future__ import annotations

from forgetting_ray.tracking import Tracker, experiment_url

from .multinode import needs_chromium, render

pytest_plugins = [f"{__package__}.multinode"]
pytestmark = needs_chromium


def test_the_experiment_opens_on_its_runs_with_their_datasets(mlflow_server, tmp_path):
    parent = Tracker.start(mlflow_server, "forgetting-ui", "pipeline")
    parent.log_params({"selection.rho": 0.7})
    parent.log_dataset("train-split", "1f" * 32, str(tmp_path / "train.parquet"), context="training", num_rows=300)
    parent.log_dataset("reference-split", "2e" * 32, str(tmp_path / "reference.parquet"), context="reference",
                       num_rows=100)
    with parent.stage("train") as train:
        for step in range(1, 4):
            train.log_metrics({"loss": 2.0 / step}, step=step)
    parent.end()

    url = experiment_url(mlflow_server, parent.experiment_id)  # the link a run prints
    dom = render(url, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-3000:]
    page = dom.stdout
    assert "pipeline" in page and "train-split" in page, page[-3000:]  # the runs table with its Dataset column
    shot = tmp_path / "runs.png"
    res = render(url, tmp_path / "profile", f"--screenshot={shot}")
    assert res.returncode == 0 and shot.stat().st_size > 10_000, res.stderr[-2000:]
