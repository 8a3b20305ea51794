"""The MLflow UI as a user opens it: a real `mlflow server` on the store the session's tiny pipeline run wrote
(``clone_run``: the parent run, its stage runs and the training and reference splits as datasets), rendered
by headless Chromium at the links a run prints.  MLflow 3.17 opens an experiment on its GenAI overview
("Traces") unless told otherwise; the link opens the runs table, whose Dataset column lists the splits.

Needs Debian's chromium (``apt-get install -y chromium``); CI installs it.
"""

from __future__ import annotations

from typing import Iterator

import mlflow
import pytest

from forgetting_ray.tracking import experiment_url, models_url

from .conftest import CloneRun
from .multinode import needs_chromium, render, serve_mlflow

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def ui(clone_run: CloneRun, tmp_path_factory) -> Iterator[str]:
    """One `mlflow server` on the clone run's store for this module's pages."""
    root = tmp_path_factory.mktemp("mlflow-ui")
    with serve_mlflow(f"sqlite:///{clone_run.run_dir}/mlflow.db", root / "artifacts", root / "mlflow.log") as url:
        yield url


def test_the_experiment_opens_on_its_runs_with_their_datasets(clone_run: CloneRun, ui: str, tmp_path):
    store = f"sqlite:///{clone_run.run_dir}/mlflow.db"
    [parent] = mlflow.MlflowClient(store).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(store).search_experiments()],
        "attributes.run_name = 'pipeline'")
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


def test_the_models_tab_lists_the_fine_tunes_with_their_scores_and_the_registered_one(clone_run: CloneRun, ui: str,
                                                                                      tmp_path):
    store = f"sqlite:///{clone_run.run_dir}/mlflow.db"
    client = mlflow.MlflowClient(store)
    [exp] = [e for e in client.search_experiments() if e.name == "forgetting-ray"]
    models = {m.name: m for m in client.search_logged_models([exp.experiment_id])}
    assert set(models) == {"reference", "forgetting"}, sorted(models)
    forgetting = models["forgetting"]
    scores = {m.key: m for m in forgetting.metrics}
    assert {"boolq", "truthfulqa", "mean"} <= set(scores) and scores["boolq"].dataset_name == "boolq"
    assert forgetting.params["strategy"] == "forgetting" and forgetting.params["rho"] == "0.7"
    assert forgetting.tags["forgetting_ray.export_uri"].startswith("file://")
    [version] = client.search_model_versions("name = 'forgetting-tiny'")  # tracking.register_as
    assert version.tags["forgetting_ray.sha256"] == forgetting.tags["forgetting_ray.sha256"]
    url = models_url(ui, exp.experiment_id)
    assert url in clone_run.stdout.replace("http://127.0.0.1:5000", ui)  # the link the run printed
    # wide enough that the grid renders the benchmark columns (it draws only the columns in view)
    dom = render(url, tmp_path / "profile", "--window-size=3600,1000", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-3000:]
    page = dom.stdout
    for text in ("forgetting", "reference", "boolq", "truthfulqa", "forgetting-tiny"):
        assert text in page, (text, page[-3000:])
