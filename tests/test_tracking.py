import json
import pickle

import pytest

from forgetting_ray.tracking import Tracker, TrackingError, check_reachable, redact, resolve_tracking_uri


def test_parent_and_stage_children_in_a_real_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = Tracker.start(uri, "exp", "pipeline")
    parent.log_params({"training.lr": 1e-4, "tracking.tracking_uri": "https://bob:hunter2@mlflow.example/x",
                       "hub.token": "abc123"})
    with parent.stage("score") as st:
        st.log_metrics({"tokens": 10, "bad": float("nan"), "flag": True}, step=3)
        (tmp_path / "hist.png").write_bytes(b"\x89PNG fake")
        st.log_artifact(tmp_path / "hist.png")
    with pytest.raises(RuntimeError):
        with parent.stage("train"):
            raise RuntimeError("boom")
    parent.end()

    client = MlflowClient(uri)
    p = client.get_run(parent.run_id)
    assert p.data.params["training.lr"] == "0.0001"
    assert "hunter2" not in p.data.params["tracking.tracking_uri"] and p.data.params["hub.token"] == "***"
    assert p.info.status == "FINISHED"
    kids = client.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    by_name = {r.info.run_name: r for r in kids}
    assert by_name["score"].info.status == "FINISHED" and by_name["train"].info.status == "FAILED"
    assert by_name["score"].data.metrics == {"tokens": 10.0}
    assert [a.path for a in client.list_artifacts(by_name["score"].info.run_id)] == ["hist.png"]
    # picklable for Ray workers; reconnects lazily
    clone = pickle.loads(pickle.dumps(st))
    clone.log_metrics({"later": 1.0})
    assert client.get_run(st.run_id).data.metrics["later"] == 1.0


def test_default_uri_is_sqlite_in_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://h:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://h:5000"
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"


def test_unreachable_server_fails_fast():
    with pytest.raises(TrackingError, match="unreachable"):
        check_reachable("http://127.0.0.1:9/", timeout_s=2)


def test_redact():
    assert redact("aws_secret_access_key", "x") == "***"
    assert redact("uri", "postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    assert redact("uri", "http://h:5000") == "http://h:5000"
    assert redact("hub.token", "hf_x") == redact("hf_token", "x") == redact("api_key", "x") == "***"
    # counts and paths whose names merely contain a secret-looking word stay readable
    assert redact("scoring.batch_tokens", 4096) == 4096 and redact("eval.asdiv_max_new_tokens", 8) == 8
    assert redact("model.tokenizer", "/models/tok") == "/models/tok"


def test_disabled_tracker_is_inert():
    t = Tracker.disabled()
    with t.stage("x") as s:
        s.log_metrics({"a": 1})
    assert s is t


def test_experiment_opens_on_its_runs_and_lists_the_datasets(tmp_path):
    """MLflow 3 opens an untagged experiment on its GenAI overview; ours is tagged as model development, and
    the runs carry their datasets by digest (the runs table's Dataset column)."""
    from mlflow.tracking import MlflowClient

    from forgetting_ray.tracking import EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = Tracker.start(uri, "exp", "pipeline")
    run.log_dataset("train-split", "ab" * 32, str(tmp_path / "train.parquet"), context="training", num_rows=12)
    client = MlflowClient(uri)
    assert client.get_experiment(run.experiment_id).tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT
    (inp,) = client.get_run(run.run_id).inputs.dataset_inputs
    assert inp.dataset.name == "train-split" and inp.dataset.digest == ("ab" * 32)[:36]
    assert str(tmp_path / "train.parquet") in inp.dataset.source and '"num_rows": 12' in inp.dataset.profile
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    # a kind the user picked in the UI is kept
    client.set_experiment_tag(run.experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    Tracker.start(uri, "exp", "again")
    assert client.get_experiment(run.experiment_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_system_metrics_are_sampled_into_the_run_while_the_block_runs(tmp_path):
    import time

    from mlflow.tracking import MlflowClient

    t = Tracker.start(f"sqlite:///{tmp_path / 'mlflow.db'}", "system", "pipeline")
    with t.system_metrics(interval_s=0.2):
        time.sleep(1.5)
    t.end()
    history = MlflowClient(t.uri).get_metric_history(t.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2 and all(0 <= m.value <= 100 for m in history)
    assert MlflowClient(t.uri).get_run(t.run_id).data.metrics["system/system_memory_usage_megabytes"] > 0


def test_compare_runs_url_opens_the_compare_view_of_those_runs():
    from urllib.parse import parse_qs, urlsplit

    from forgetting_ray.tracking import compare_runs_url

    url = compare_runs_url("http://127.0.0.1:5000/", "7", ["a1", "b2"])
    assert url.startswith("http://127.0.0.1:5000/#/compare-runs?")
    query = parse_qs(urlsplit(url).fragment.split("?", 1)[1])
    assert query == {"runs": ['["a1", "b2"]'], "experiments": ['["7"]']}


def test_close_trial_runs_marks_the_runs_the_scheduler_stopped_errored_or_restarted(tmp_path):
    from mlflow.tracking import MlflowClient

    from forgetting_ray.tracking import TRIAL_ID_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stage = Tracker.start(uri, "exp", "tune")
    runs = {tid: stage.child(f"trial-{tid}", {TRIAL_ID_TAG: tid}) for tid in ("stopped", "raced", "errored", "done")}
    runs["raced"].end("FAILED")  # killed inside the trial's own tracking context
    runs["done"].end("FINISHED")
    stage.close_trial_runs(stopped=["stopped", "raced", "done"], errored=["errored"], restarts={"done": 2})
    client = MlflowClient(uri)
    status = {tid: client.get_run(t.run_id) for tid, t in runs.items()}
    assert {tid: r.info.status for tid, r in status.items()} == {
        "stopped": "KILLED", "raced": "KILLED", "errored": "FAILED", "done": "FINISHED"}
    assert status["stopped"].data.tags["forgetting_ray.stopped_by"] == "scheduler"
    assert "forgetting_ray.stopped_by" not in status["errored"].data.tags
    assert status["done"].data.tags["forgetting_ray.restarts"] == "2"  # Tune restarted it twice
    assert "forgetting_ray.restarts" not in status["stopped"].data.tags
    Tracker.disabled().close_trial_runs(stopped=["x"], errored=[])  # nothing to close, no store


def test_an_export_is_a_logged_model_with_its_scores_and_a_registered_version(tmp_path, monkeypatch):
    """Each fine-tune's export as an MLflow LoggedModel (the Models tab): by URI and sha256, weights copied only
    when asked; its benchmark scores linked to it and their datasets; registered as a new version, once."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root would be ./mlruns here
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"weights")
    uri = f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    (tmp_path / "run").mkdir()
    pipeline = Tracker.start(uri, "exp", "pipeline")
    train = pipeline.child("train")
    model_id = train.log_model("train", export, "sha-1", {"strategy": "forgetting", "rho": 0.7, "hub.token": "x"})
    assert train.log_model("train", export, "sha-1", {"strategy": "forgetting"}) == model_id  # a rerun: same model
    pipeline.log_metrics({"boolq": 0.61}, model_id=model_id, dataset=("boolq", "d" * 64))
    pipeline.log_metrics({"mean": 0.55}, model_id=model_id)

    client = MlflowClient(uri)
    model = client.get_logged_model(model_id)
    assert model.name == "train" and model.status == "READY" and model.source_run_id == train.run_id
    assert model.params == {"strategy": "forgetting", "rho": "0.7", "hub.token": "***"}
    assert model.tags["forgetting_ray.export_uri"] == export.as_uri() and model.tags["mlflow.model.isExternal"] == "true"
    assert {(m.key, m.value, m.dataset_name) for m in model.metrics} == {("boolq", 0.61, "boolq"), ("mean", 0.55, None)}
    artifacts = {a.path for a in client.list_logged_model_artifacts(model_id)}
    assert artifacts == {"MLmodel"}  # the weights stay where they are
    assert model.artifact_location.startswith((tmp_path / "run" / "mlartifacts").as_uri())  # beside the store
    assert not (tmp_path / "mlruns").exists()

    uploaded = train.log_model("train", export, "sha-2", upload=True)
    assert uploaded != model_id
    assert "export/model.safetensors" in {a.path for a in client.list_logged_model_artifacts(uploaded, "export")}

    assert pipeline.register_model(model_id, "forgetting-demo") == 1
    assert pipeline.register_model(model_id, "forgetting-demo") == 1  # already registered: its version
    assert pipeline.register_model(uploaded, "forgetting-demo") == 2
    version = client.get_model_version("forgetting-demo", "1")
    assert version.tags["forgetting_ray.sha256"] == "sha-1" and version.run_id == train.run_id
    assert json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"]) == [
        {"name": "forgetting-demo", "version": "1"}]  # the Models tab's "Registered models" column
    assert Tracker.disabled().log_model("train", export, "sha-1") is None


class _Outage:
    """An MlflowClient whose server stops answering while ``down`` is set (the error requests raises)."""

    def __init__(self, uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.real, self.down = MlflowClient(uri), False

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.down:
                import requests

                raise requests.ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded")
            return attr(*args, **kwargs)
        return call


def test_an_outage_keeps_the_writes_in_order_and_sends_them_when_mlflow_answers(tmp_path, monkeypatch, caplog):
    """Writes while MLflow is down (metrics, tags, a new child run and its writes, the ends) go to the outbox with
    one warning; the next write after it answers sends them in order: the same histories, timestamps included."""
    from mlflow.tracking import MlflowClient

    from forgetting_ray import tracking
    from forgetting_ray.tracking import OUTBOX_FILE, Outbox

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    journal = tmp_path / OUTBOX_FILE
    pipeline = Tracker.start(uri, "exp", "pipeline", journal=journal)
    client = _Outage(uri)
    pipeline._client = client
    train = pipeline.child("train")
    for step in range(3):
        train.log_metrics({"loss": 3.0 - step}, step=step)
    client.down = True
    for step in range(3, 6):
        train.log_metrics({"loss": 3.0 - step}, step=step)
    train.set_tags({"guardrail.stop_reason": "none"})
    train.end("FINISHED")
    with pipeline.stage("eval-forgetting") as ev:  # a run created while the server is down
        ev.log_params({"model": "/x"})
        ev.log_metrics({"eval.average": 0.5})
    assert ev.run_id.startswith(tracking.PENDING)
    assert Outbox.of(str(journal)).pending() == 9
    assert caplog.text.count("is not answering") == 1  # one warning line, not one per write
    kept_ts = [json.loads(line)["kwargs"]["timestamp_ms"] for line in journal.read_text().splitlines()[:3]]

    client.down = False
    monkeypatch.setattr(tracking, "RETRY_OUTBOX_S", 0.0)
    pipeline.log_metrics({"answer": 1.0})  # the next write sends what was kept first
    assert not journal.exists() and "answers again: sent the 9 writes" in caplog.text
    real = MlflowClient(uri)
    history = real.get_metric_history(train.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 3.0 - s) for s in range(6)]
    assert [m.timestamp for m in history][3:] == kept_ts  # when they were measured, not when sent
    t = real.get_run(train.run_id)
    assert t.info.status == "FINISHED" and t.data.tags["guardrail.stop_reason"] == "none"
    [e] = real.search_runs([pipeline.experiment_id], "attributes.run_name = 'eval-forgetting'")
    assert e.data.tags["mlflow.parentRunId"] == pipeline.run_id and e.info.status == "FINISHED"
    assert e.data.params == {"model": "/x"} and e.data.metrics == {"eval.average": 0.5}
    assert real.get_run(pipeline.run_id).data.metrics == {"answer": 1.0}


def test_a_request_mlflow_refuses_is_not_kept(tmp_path):
    """Only a server that does not answer fills the outbox; a write it refuses raises as before."""
    from mlflow.exceptions import MlflowException

    from forgetting_ray.tracking import OUTBOX_FILE

    t = Tracker.start(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", "pipeline", journal=tmp_path / OUTBOX_FILE)
    t.log_params({"a": 1})
    with pytest.raises(MlflowException):
        t.log_params({"a": 2})  # params are immutable: MLflow refuses
    assert not (tmp_path / OUTBOX_FILE).exists()
