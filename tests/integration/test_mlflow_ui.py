"""The MLflow UI as a user opens it: a real `mlflow server` on the store the session's tiny pipeline run wrote
(``clone_run``: the parent run, its stage runs and the training and reference splits as datasets), rendered
by headless Chromium at the link a run prints.  MLflow 3.17 opens an experiment on its GenAI overview
("Traces") unless told otherwise; the link opens the runs table, whose Dataset column lists the splits.

Needs Debian's chromium (``apt-get install -y chromium``); CI installs it.
"""

from __future__ import annotations

import mlflow

from forgetting_ray.tracking import experiment_url

from .conftest import CloneRun
from .multinode import needs_chromium, render, serve_mlflow

pytestmark = needs_chromium


def test_the_experiment_opens_on_its_runs_with_their_datasets(clone_run: CloneRun, tmp_path):
    store = f"sqlite:///{clone_run.run_dir}/mlflow.db"
    [parent] = mlflow.MlflowClient(store).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(store).search_experiments()],
        "attributes.run_name = 'pipeline'")
    with serve_mlflow(store, tmp_path / "artifacts", tmp_path / "mlflow.log") as ui:
        url = experiment_url(ui, parent.info.experiment_id)  # the link a run prints
        dom = render(url, tmp_path / "profile", "--dump-dom")
        shot = tmp_path / "runs.png"
        res = render(url, tmp_path / "profile", f"--screenshot={shot}")
    assert dom.returncode == 0, dom.stderr[-3000:]
    page = dom.stdout
    # the runs table: the pipeline run, with the splits in its Dataset column
    for text in ("pipeline", "train-split", "reference-split"):
        assert text in page, (text, page[-3000:])
    assert res.returncode == 0 and shot.stat().st_size > 10_000, res.stderr[-2000:]
