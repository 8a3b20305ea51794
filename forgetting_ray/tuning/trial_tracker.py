"""The trials' MLflow runs, written from the driver (:class:`TrialTracker`, a Ray Tune callback built with
:func:`forgetting_ray.tuning.callbacks.tune_callback`), and :func:`load_trial_result`, how the driver finds
the fine-tune a trial reported."""

from __future__ import annotations

from typing import Any

from ..config import PipelineConfig
from ..report.plots import log_finetune_plots
from ..search import OBJECTIVE_METRIC, trial_config
from ..stages.train import FinetuneResult, load_result, model_params
from ..store import is_complete, local_path, portable, tree_sha256
from ..tracking import TRIAL_ID_TAG, Tracker

# what Tune adds to every report: bookkeeping, not measurements
TUNE_AUTO_KEYS = {"timestamp", "time_this_iter_s", "time_total_s", "training_iteration", "pid", "done",
                  "time_since_restore", "iterations_since_restore", "step", "trained"}


def load_trial_result(location: str, cfg: PipelineConfig) -> FinetuneResult:
    """A trial's fine-tune result, from the folder it reported (``out_dir``, portable), present on this node."""
    out = local_path(location, cfg.run_dir)
    if not is_complete(out):
        raise RuntimeError(f"tune: the trial's output {location} is not complete")
    return load_result(out)


def log_trial_params(t: Tracker, trial_id: str, params: dict[str, Any], cfg: PipelineConfig) -> None:
    t.log_params({"trial_id": trial_id, **{f"search.{k}": v for k, v in sorted(params.items())},
                  "selection.rho": cfg.selection.rho, "training.lambda_schedule": cfg.training.lambda_schedule,
                  "training.t_max": cfg.training.t_max, "training.t_min": cfg.training.t_min,
                  "training.lr": cfg.training.lr, "training.strategy": cfg.training.strategy})


class TrialTracker:
    """The trials' MLflow runs, written from the driver as Tune hands it the trials' reports: the
    tracking server need only be reachable from here (on a cluster, the head)."""

    def __init__(self, parent: Tracker, base: PipelineConfig, report_every: int, score_key: str):
        self.parent, self.base, self.report_every, self.score_key = parent, base, report_every, score_key
        self.runs: dict[str, Tracker] = {}
        self.run_ids: dict[str, str] = {}  # every trial's, kept after it ends

    def on_trial_start(self, iteration, trials, trial, **info):
        tid = trial.trial_id
        if not self.parent.enabled or tid in self.runs:
            return
        t = self.parent.child(f"trial-{tid}", {"forgetting_ray.stage": "tune-trial", TRIAL_ID_TAG: tid})
        params = dict(trial.config or {})
        log_trial_params(t, tid, params, trial_config(self.base, params, report_every=self.report_every))
        t.log_params({"score_key": self.score_key})
        self.runs[tid], self.run_ids[tid] = t, t.run_id

    def on_trial_result(self, iteration, trials, trial, result, **info):
        t = self.runs.get(trial.trial_id)
        if t is None:
            return
        t.log_metrics({k: v for k, v in result.items() if k not in TUNE_AUTO_KEYS}, step=int(result.get("step", 0)))
        if "partition_key" in result:  # the final report
            t.log_params({"partition_key": result["partition_key"], "train_table": result["train_table_used"]})

    def on_trial_complete(self, iteration, trials, trial, **info):
        t = self.runs.pop(trial.trial_id, None)
        last = trial.last_result or {}
        if t is None or OBJECTIVE_METRIC not in last:
            return  # stopped by the scheduler: Tracker.close_trial_runs marks its run KILLED
        try:
            res = load_trial_result(last["out_dir"], self.base)
            cfg = trial_config(self.base, dict(trial.config or {}))
            log_finetune_plots(t, res, cfg.training)
            model_id = t.log_model(f"trial-{trial.trial_id}", portable(res.export_dir), tree_sha256(res.export_dir),
                                   model_params(cfg, "train") | {"trial_id": trial.trial_id})
            t.log_metrics({k: last[k] for k in (OBJECTIVE_METRIC, self.score_key) if k in last}, model_id=model_id)
        finally:
            t.end("FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        t = self.runs.pop(trial.trial_id, None)
        if t is not None:
            t.end("FAILED")
