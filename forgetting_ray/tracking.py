"""MLflow lineage: one parent run per pipeline invocation, one child run per stage or Tune trial.

Runs are addressed by id through ``MlflowClient`` rather than MLflow's process-global "active
run", so a :class:`Tracker` can be pickled into a Ray worker or a Tune trial and keep logging into
the same tree.  Only the process that owns the tracker logs; Ray Train loops log from rank 0 only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import functools
import re
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import urlencode

from .store import remote_of, run_root

log = logging.getLogger(__name__)

# whole words of a key's last segment: "hub.token" and "aws_secret_access_key" are secrets, "batch_tokens" and
# "tokenizer" are not
SECRET_KEY = re.compile(r"(^|[_-])(pass(word)?|secret|token|api[_-]?key|credentials?|auth)($|[_-])", re.I)
URI_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^/@:]+)(:(?P<pw>[^/@]*))?@", re.I)
MAX_PARAM_LEN = 6000  # MLflow's limit for a param value
TRIAL_ID_TAG = "forgetting_ray.trial_id"  # on a Tune trial's child run
MODEL_URI_TAG = "forgetting_ray.export_uri"  # on a LoggedModel: where its export folder is
MODEL_SHA256_TAG = "forgetting_ray.sha256"  # on a LoggedModel and a registered version: the export's tree hash


class TrackingError(RuntimeError):
    pass


OUTBOX_FILE = "mlflow_pending.jsonl"  # in the run folder: what MLflow could not take yet
RETRY_OUTBOX_S = 30.0  # while MLflow is down, how often a write tries to send what is kept
PENDING = "pending-"  # the id of a run created while MLflow was down, until it is sent
# errors that mean "the server is not answering now", not "the request is wrong"
UNREACHABLE = ("Max retries exceeded", "Connection refused", "Failed to establish", "Read timed out",
               "Connection aborted", "RemoteDisconnected", "error code 502", "error code 503", "error code 504")


def _unreachable(e: BaseException) -> bool:
    import requests

    return isinstance(e, (requests.ConnectionError, requests.Timeout)) or any(m in str(e) for m in UNREACHABLE)


class Outbox:
    """The writes an MLflow server that stopped answering could not take, kept in order in a journal file in the
    run folder and sent, in order, when it answers again (a later write tries every ``RETRY_OUTBOX_S``; the run's
    end tries once more; ``forgetting-ray sync RUN_DIR`` sends them by hand).  A run created meanwhile gets a
    placeholder id, mapped to the real one as it is sent.  One per journal file in a process."""

    _open: dict[str, "Outbox"] = {}

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.last_try = 0.0
        self.warned = False

    @classmethod
    def of(cls, path: str) -> "Outbox | None":
        if not path:
            return None
        if path not in cls._open:
            cls._open[path] = cls(Path(path))
        return cls._open[path]

    def pending(self) -> int:
        try:
            return sum(1 for line in self.path.read_text().splitlines() if line.strip())
        except FileNotFoundError:
            return 0

    def keep(self, tracker: "Tracker", method: str, args: tuple, kwargs: dict, error: BaseException | None) -> Any:
        """Append one write; a ``child`` gets a placeholder run to log into."""
        placeholder = f"{PENDING}{uuid.uuid4().hex}" if method == "child" else None
        op = {"run_id": tracker.run_id, "method": method, "args": list(args), "kwargs": kwargs, "creates": placeholder}
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(op, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if not self.warned:
                self.warned = True
                log.warning("MLflow at %s is not answering (%s): tracking is degraded; its writes are kept in %s and "
                            "sent when it answers again (or: forgetting-ray sync %s)", redact("uri", tracker.uri),
                            str(error).splitlines()[0][:200] if error else "earlier failure", self.path,
                            self.path.parent)
        if placeholder:
            return Tracker(uri=tracker.uri, experiment_id=tracker.experiment_id, run_id=placeholder,
                           journal=tracker.journal, _client=tracker._client)
        return None

    def due(self) -> bool:
        return time.time() - self.last_try >= RETRY_OUTBOX_S

    def send(self, uri: str, experiment_id: str, client: Any = None) -> int:
        """Send every kept write in order; returns how many were sent.  Stops at the first one the server does not
        take (it stays first in the journal, with the runs created so far mapped to their real ids)."""
        with self.lock:
            self.last_try = time.time()
            try:
                ops = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            except FileNotFoundError:
                return 0
            ids: dict[str, str] = {}
            sent = 0
            try:
                for op in ops:
                    run_id = ids.get(op["run_id"], op["run_id"])
                    target = Tracker(uri=uri, experiment_id=experiment_id, run_id=run_id, _client=client)
                    result = getattr(target, op["method"]).__wrapped__(target, *op["args"], **op["kwargs"])
                    if op.get("creates"):
                        ids[op["creates"]] = result.run_id
                    sent += 1
            except Exception as e:
                if not _unreachable(e):
                    raise
                rest = ops[sent:]
                for op in rest:
                    op["run_id"] = ids.get(op["run_id"], op["run_id"])
                tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
                tmp.write_text("".join(json.dumps(op, default=str) + "\n" for op in rest))
                os.replace(tmp, self.path)
                return sent
            self.path.unlink(missing_ok=True)
            if sent:
                log.warning("MLflow at %s answers again: sent the %d writes kept while it was down",
                            redact("uri", uri), sent)
            self.warned = False
            return sent


def _journaled(method):
    """A write to MLflow that an outage does not lose: while the server does not answer, it goes to the run's
    :class:`Outbox` (after any writes already kept, so the order holds)."""

    @functools.wraps(method)
    def write(self: "Tracker", *args, **kwargs):
        box = Outbox.of(self.journal) if self.enabled else None
        if box is None:
            return method(self, *args, **kwargs)
        if method.__name__ == "log_metrics":
            kwargs.setdefault("timestamp_ms", int(time.time() * 1000))  # the time it was measured, kept as it is sent
        if box.pending():
            if not box.due():
                return box.keep(self, method.__name__, args, kwargs, None)
            box.send(self.uri, self.experiment_id, self._client)
            if box.pending():
                return box.keep(self, method.__name__, args, kwargs, None)
        if self.run_id.startswith(PENDING):  # a run created during the outage: only the journal knows it
            return box.keep(self, method.__name__, args, kwargs, None)
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            if not _unreachable(e):
                raise
            return box.keep(self, method.__name__, args, kwargs, e)

    return write


def redact(key: str, value: Any) -> Any:
    """Hide secrets: values of secret-looking keys, and passwords inside URIs."""
    if value is None:
        return value
    if SECRET_KEY.search(key.split(".")[-1]):
        return "***"
    if isinstance(value, str):
        return URI_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@" if m["pw"] is not None else m[0], value)
    return value


def resolve_tracking_uri(tracking_uri: str | None, run_dir: str | Path) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a sqlite store in the run directory.

    mlflow 3.17 refuses the plain file store, so the local default is sqlite.
    """
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = run_root(run_dir) / "mlflow.db"  # a bucket run keeps its default store in the node-local mirror
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def _local_artifact_location(uri: str) -> str | None:
    """Beside a sqlite store: its artifacts (plots, configs, models' MLmodel files) in ``mlartifacts/`` next to
    the database, where MLflow would put them in ``./mlruns`` of whatever folder the run started in."""
    if not uri.startswith("sqlite:///"):
        return None  # a server decides where its artifacts go
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail before any compute when a remote tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - user-configured URI
            if resp.status >= 400:
                raise TrackingError(f"MLflow tracking server {redact('uri', uri)} answered HTTP {resp.status}")
    except (urllib.error.URLError, OSError) as e:
        raise TrackingError(
            f"MLflow tracking server {redact('uri', uri)} is unreachable ({e}). Start it, fix "
            "tracking.tracking_uri, or set tracking.tracking_uri to null to use the local store."
        ) from None


# MLflow 3 opens an experiment without this tag on its GenAI overview ("Traces: 0"); tagged as model
# development, the experiment opens on its runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"


def experiment_url(ui: str, experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI.  MLflow 3.17's UI picks its view from a global workflow
    switch (GenAI by default) rather than from the experiment's kind tag; the URL selects machine learning."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def models_url(ui: str, experiment_id: str) -> str:
    """The experiment's Models tab: every fine-tune's export with its parameters and benchmark scores."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/models?workflowType=machine_learning"


def compare_runs_url(ui: str, experiment_id: str, run_ids: list[str]) -> str:
    """The MLflow UI's compare view of ``run_ids``: their params (e.g. each trial's rho and lambda schedule)
    side by side, and parallel-coordinates and scatter charts of params against metrics."""
    query = urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])})
    return f"{ui.rstrip('/')}/#/compare-runs?{query}"


@dataclass
class Tracker:
    """A handle on one MLflow run; picklable (holds ids, not clients)."""

    uri: str
    experiment_id: str
    run_id: str
    enabled: bool = True
    journal: str = ""  # the Outbox file of this run's writes while MLflow is down ("": none, writes raise)
    _client: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None,
              journal: str | Path | None = None) -> "Tracker":
        """A new run; ``journal``: where its writes wait while a server stops answering (see :class:`Outbox`)."""
        from mlflow.tracking import MlflowClient

        check_reachable(uri)
        if journal and uri.startswith(("http://", "https://")):
            # MLflow retries a refused connection 7 times over minutes; the outbox takes over after a few seconds
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            exp_id = client.create_experiment(experiment, artifact_location=_local_artifact_location(uri),
                                              tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT})
        else:
            exp_id = exp.experiment_id
            if EXPERIMENT_KIND_TAG not in exp.tags:  # a kind the user chose in the UI stays
                client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
        run = client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
        return cls(uri=uri, experiment_id=exp_id, run_id=run.info.run_id, journal=str(journal or ""), _client=client)

    @classmethod
    def disabled(cls) -> "Tracker":
        return cls(uri="", experiment_id="", run_id="", enabled=False)

    @_journaled
    def child(self, run_name: str, tags: Mapping[str, str] | None = None) -> "Tracker":
        if not self.enabled:
            return self
        all_tags = {"mlflow.parentRunId": self.run_id, **(tags or {})}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        return Tracker(uri=self.uri, experiment_id=self.experiment_id, run_id=run.info.run_id, journal=self.journal,
                       _client=self._client)

    @contextmanager
    def stage(self, name: str, tags: Mapping[str, str] | None = None) -> Iterator["Tracker"]:
        """A child run that ends FINISHED, or FAILED when the block raises."""
        run = self.child(name, {"forgetting_ray.stage": name, **(tags or {})})
        try:
            yield run
        except BaseException:
            run.end("FAILED")
            raise
        run.end("FINISHED")

    @contextmanager
    def system_metrics(self, interval_s: float) -> Iterator[None]:
        """While the block runs, sample this node's CPU, memory, disk, network and GPUs every ``interval_s``
        into this run as ``system/*`` metrics (MLflow's monitor, in a thread of this process)."""
        if not self.enabled:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    @_journaled
    def end(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, status=status)

    def send_kept(self) -> int:
        """Send what the outbox holds now (the run's end calls it; a server still down keeps it)."""
        box = Outbox.of(self.journal) if self.enabled else None
        return box.send(self.uri, self.experiment_id, self._client) if box is not None and box.pending() else 0

    def close_trial_runs(self, stopped: Iterable[str], errored: Iterable[str],
                         restarts: Mapping[str, int] | None = None) -> None:
        """End the child runs of the Tune trials that did not finish (tagged :data:`TRIAL_ID_TAG`), and tag
        ``forgetting_ray.restarts`` on the runs of trials Tune restarted after their process died.

        Trials the scheduler stopped were killed mid-fit: their runs become KILLED, not RUNNING, tagged
        ``forgetting_ray.stopped_by=scheduler``.  A kill that lands inside the trial's own tracking context
        can leave the run FAILED first (a race with the trial's teardown); the scheduler's decision is what
        happened, so that becomes KILLED too.  Runs of trials that errored and are still RUNNING become FAILED.
        """
        if not self.enabled:
            return
        stopped, errored = set(stopped), set(errored)
        try:
            runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'")
        except Exception as e:
            if not _unreachable(e):
                raise
            log.warning("MLflow is not answering: the stopped trials' runs stay RUNNING (%s)", str(e).splitlines()[0])
            return
        for run in runs:
            tid = run.data.tags.get(TRIAL_ID_TAG)
            if (restarts or {}).get(tid):
                self.client.set_tag(run.info.run_id, "forgetting_ray.restarts", str(restarts[tid]))
            if run.info.status in ("RUNNING", "FAILED") and tid in stopped:
                self.client.set_terminated(run.info.run_id, status="KILLED")
                self.client.set_tag(run.info.run_id, "forgetting_ray.stopped_by", "scheduler")
            elif run.info.status == "RUNNING" and tid in errored:
                self.client.set_terminated(run.info.run_id, status="FAILED")

    # -- logging ----------------------------------------------------------------------------
    @_journaled
    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(redact(k, v))[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow batch limit
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    @_journaled
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, *, model_id: str | None = None,
                    dataset: tuple[str, str] | None = None, timestamp_ms: int | None = None) -> None:
        """Finite numbers only; ``model_id`` links them to a LoggedModel (its scores in the Models tab), and
        ``dataset`` (name, digest) to the dataset they were measured on."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = timestamp_ms or int(time.time() * 1000)
        name, digest = dataset or (None, None)
        digest = digest[:36] if digest else None  # as log_dataset stores it
        items = [
            Metric(k, float(v), now, step or 0, model_id=model_id, dataset_name=name, dataset_digest=digest)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    @_journaled
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(redact(k, v)))

    @_journaled
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    @_journaled
    def log_dataset(self, name: str, digest: str, source: str, context: str, num_rows: int | None = None) -> None:
        """Record a dataset this run read (the runs table's Dataset column): by name, content digest and
        where it is, never its rows."""
        if not self.enabled:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="s3" if source.startswith("s3://") else "local",
                          source=json.dumps({"uri": source}),
                          profile=json.dumps({"num_rows": num_rows}) if num_rows is not None else None)
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    @_journaled
    def log_dict(self, obj: Any, name: str) -> None:
        if self.enabled:
            self.client.log_dict(self.run_id, obj, name)

    @_journaled
    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, name)

    @_journaled
    def log_model(self, name: str, path: str | Path, sha256: str, params: Mapping[str, Any] | None = None,
                  upload: bool = False) -> str | None:
        """Record an export as an MLflow LoggedModel of this run (the UI's Models tab): its parameters, and its
        folder by URI and sha256; the weights are copied into MLflow only when ``upload``.  The same export
        logged again (a rerun that reused it) is the same model.  Returns the model's id."""
        if not self.enabled:
            return None
        # a bucket run's export is in the driver's mirror: the model names the bucket, which every node reaches
        uri = str(path) if "://" in str(path) else (remote_of(path) or Path(path).resolve().as_uri())
        self.set_tags({f"model.{name}.uri": uri, f"model.{name}.sha256": sha256})
        for known in self.client.search_logged_models([self.experiment_id], filter_string=f"name = '{name}'"):
            if known.tags.get(MODEL_SHA256_TAG) == sha256 and known.status == "READY":
                self.set_tags({f"model.{name}.id": known.model_id})
                return known.model_id
        from mlflow.models.model import MLMODEL_FILE_NAME, Model
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

        tags = {MODEL_URI_TAG: uri, MODEL_SHA256_TAG: sha256}
        if not upload:
            tags[MLFLOW_MODEL_IS_EXTERNAL] = "true"
        model = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=self.run_id, tags=tags, model_type="fine-tune",
            params={k: str(redact(k, v))[:MAX_PARAM_LEN] for k, v in (params or {}).items()})
        # an MLmodel file makes the model registrable; it says where the weights are when MLflow does not hold them
        spec = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, model_id=model.model_id,
                     run_id=self.run_id, metadata=None if upload else {MLFLOW_MODEL_IS_EXTERNAL: True, "uri": uri})
        with tempfile.TemporaryDirectory() as tmp:
            spec.save(str(Path(tmp) / MLMODEL_FILE_NAME))
            self.client.log_model_artifacts(model.model_id, tmp)
        if upload:
            self.client.log_model_artifacts(model.model_id, str(path), "export")
        self.client.finalize_logged_model(model.model_id, "READY")
        self.set_tags({f"model.{name}.id": model.model_id})
        return model.model_id

    @_journaled
    def register_model(self, model_id: str, name: str) -> int:
        """A new version of registered model ``name`` (created when missing) for the LoggedModel ``model_id``,
        tagged with its sha256; an export already registered under ``name`` keeps its version."""
        from mlflow.exceptions import MlflowException

        model = self.client.get_logged_model(model_id)
        sha256 = model.tags.get(MODEL_SHA256_TAG, "")
        try:
            self.client.create_registered_model(name, description="FORGETTING fine-tunes (forgetting-ray)")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        for version in self.client.search_model_versions(f"name = '{name}'"):
            if version.tags.get(MODEL_SHA256_TAG) == sha256:
                return int(version.version)
        # the model's artifact location, not models:/<id>: a local store would resolve that id through MLflow's
        # process-global tracking URI, which need not be this tracker's
        version = self.client.create_model_version(
            name, source=model.artifact_location, run_id=model.source_run_id, model_id=model_id,
            tags={MODEL_SHA256_TAG: sha256, MODEL_URI_TAG: model.tags.get(MODEL_URI_TAG, "")})
        # what mlflow.register_model records on the model: the Models tab's "Registered models" column
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        versions = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS, "[]")) + [{"name": name, "version": str(version.version)}]
        self.client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})
        return int(version.version)
