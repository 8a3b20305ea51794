"""TUNE stage: a Ray Tune search over rho and the lambda schedule (name, t_max, t_min, optionally lr).

Recipe, top to bottom (``run_tune``):

1. resolve the objective (eval_mean or val_nll) and its direction, and describe the search space;
2. ``_open_search_folder``: key the search folder by what every trial shares (scores, base training
   settings, validation split) and refuse a restart whose search space changed;
3. ``_validation_split``: hold out a seeded validation split of the samples (the same for every rho);
4. ``_data_plan``: check the remaining samples make at least one step;
5. ``_scheduler`` (ASHA | FIFO) and ``_searcher`` (random | Optuna), sized to the cluster;
6. ``_fit``: ``Tuner.fit`` (or restore an interrupted search), reaping what stopped trials leave behind;
7. ``_collect_trials``: one record per trial (with how often Tune restarted it); ``Tracker.close_trial_runs``
   closes the MLflow runs of the trials the scheduler stopped and tags the restarted ones;
8. ``_finish``: pick the best finished trial, write ``result.json``, load its model and partition.

A trial (``_trial``, a function trainable: the Ray Train V2 pattern, not ``Tuner(trainer)``)
re-partitions the cached scores with its rho (``run_partition``; the scores are never recomputed:
their key does not depend on rho or lambda), drops the validation samples, trains with the
forgetting strategy through ``run_finetune`` (its own ``TorchTrainer``), and reports:

* every training report, through :class:`~forgetting_ray.tuning.callbacks.TrialReport`, with
  ``online_nll``: the NLL of all response tokens of the step's micro-batches, measured by the
  forward pass *before* the update that uses them (progressive validation: in the first epoch
  those samples are unseen).  ASHA compares trials on it at its rungs, so it can stop a trial long
  before the objective exists;
* once, after training, ``objective``: the mean eval score on the seeded dev subset, or the NLL of
  every response token of the held-out validation split under the exported model
  (:mod:`forgetting_ray.tuning.objectives`).

The maths (space description and hash, trial configs, online NLL, the split, best-trial choice)
lives in :mod:`forgetting_ray.search`, plain functions testable without Ray; the search's Ray
callbacks (progress bar, pending-trial watch, the trials' MLflow runs) in :mod:`forgetting_ray.tuning`;
the private-Ray-API clean-up after stopped trials in :mod:`forgetting_ray.cluster.internals`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..cluster.capacity import (
    PlacementTimeout,
    alive_node_cpus,
    check_worker_group,
    describe_pool_problem,
    largest_fitting_concurrency,
    starves_ray_data,
)
from ..cluster.internals import pg_recorder_class, reaper_class
from ..cluster.session import init_ray, working_in
from ..config import PipelineConfig, TuneConfig, config_to_dict
from ..console import quiet
from ..search import (
    OBJECTIVE_METRIC,
    ONLINE_METRIC,
    SPACE_FILE,
    TRIAL_CPUS,
    TuneInputError,
    check_search_space,
    default_max_concurrent,
    in_validation,
    objective_mode,
    pick_best,
    resolve_objective,
    space_hash,
    space_spec,
    trial_config,
)
from ..store import (
    atomic_path,
    atomic_write_json,
    content_hash,
    fetch,
    join_storage,
    local_path,
    portable,
    run_root,
)
from ..tracking import Tracker
from ..train.data_plan import DataPlan
from ..tuning.callbacks import PendingTrialWatch, TrialProgress, trial_report_callback, tune_callback
from ..tuning.objectives import final_metrics
from ..tuning.trial_tracker import TrialTracker, load_trial_result
from .evaluate import eval_data_fingerprint
from .partition import PartitionResult, run_partition
from .train import FinetuneResult, run_finetune

log = logging.getLogger(__name__)

STAGE = "tune"
VAL_FILE = "val.parquet"


@dataclass
class TuneResult:
    dir: Path
    key: str
    space_hash: str
    objective: str
    mode: str
    trials: list[dict[str, Any]]  # trial_id, config, restarts, status, objective, last step, out_dir, ...
    best: dict[str, Any] | None
    best_config: PipelineConfig | None = None
    best_train: Any = None  # FinetuneResult of the best trial
    best_partition: Any = None  # PartitionResult at the best rho
    best_table: Path | None = None  # the table the best trial trained on (validation split removed)
    stats: dict[str, Any] = field(default_factory=dict)
    trial_runs: dict[str, str] = field(default_factory=dict)  # trial id -> its MLflow run id

    @property
    def best_export_dir(self) -> Path | None:
        return self.best_train.export_dir if self.best_train is not None else None

    @property
    def n_stopped_early(self) -> int:
        return sum(t["status"] == "stopped" for t in self.trials)


# ------------------------------------------------------------------------------------------------
# one trial
# ------------------------------------------------------------------------------------------------
def _trial_tables(part: PartitionResult, val_ids: set[str], folder: Path) -> Path:
    """The partitioned table at this rho minus the validation samples (written once per rho)."""
    if not val_ids:
        return part.train_path
    out = folder / f"train-{part.key}.parquet"
    if out.is_file():
        return out
    tbl = pq.read_table(part.train_path)
    keep = pc.invert(pc.is_in(tbl.column("sample_id"), value_set=pa.array(sorted(val_ids), pa.string())))
    with atomic_path(out) as tmp:
        pq.write_table(tbl.filter(keep), tmp)
    return out


def _train_trial(cfg: PipelineConfig, table: Path, folder: Path, trial_id: str) -> FinetuneResult:
    callbacks = [trial_report_callback(), pg_recorder_class()(trial_id)]
    res = run_finetune(cfg, "train", table, folder / "trials" / trial_id, callbacks=callbacks)
    if res.export_dir is None:
        raise RuntimeError(f"trial {trial_id} stopped without an export: {res.stop_reason}")
    return res


def _trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One trial: re-partition with its rho, train with its schedule, report the objective.

    It may run on any node: the paths in ``ctx`` are portable (URIs when the run is in a bucket) and
    map to this node's mirror; it writes no MLflow (the driver's :class:`TrialTracker` does)."""
    import ray.tune

    base: PipelineConfig = ctx["cfg"]
    cfg = trial_config(base, params, report_every=ctx["report_every"])
    trial_id = ray.tune.get_context().get_trial_id()
    here = {k: local_path(ctx[k], base.run_dir) for k in ("dir", "train_table", "score_dir", "val_table")}
    folder = here["dir"]
    ctx = {**ctx, "val_table": fetch(here["val_table"])}
    part = run_partition(cfg, fetch(here["train_table"]), here["score_dir"])
    table = _trial_tables(part, set(ctx["val_ids"]), folder / "tables")
    res = _train_trial(cfg, table, folder, trial_id)
    final = final_metrics(ctx, base, cfg, res, folder, trial_id)
    ray.tune.report({**final, "out_dir": portable(res.out_dir), "partition_dir": portable(part.dir),
                     "partition_key": part.key, "train_table_used": portable(table),
                     "node_id": ray.get_runtime_context().get_node_id()})


# ------------------------------------------------------------------------------------------------
# the search
# ------------------------------------------------------------------------------------------------
def _open_search_folder(cfg: PipelineConfig, score: Any, objective: str, spec: dict[str, Any]) -> tuple[str, Path]:
    """Key the search by what every trial shares; refuse a restart with another space. Returns (key, folder)."""
    tc = cfg.tune
    shared = {"score_key": score.key, "model": config_to_dict(cfg.model), "resources": cfg.resources.num_workers,
              "training": {k: v for k, v in config_to_dict(cfg.training).items()
                           if k not in ("strategy", "lambda_schedule", "t_max", "t_min", "lr", "report_every")},
              "val": [tc.val_fraction, tc.seed], "objective": objective,
              "eval": config_to_dict(cfg.eval) if objective == "eval_mean" else None,
              "eval_data": eval_data_fingerprint(cfg.eval) if objective == "eval_mean" else None}
    key = content_hash(shared)
    folder = run_root(cfg.run_dir) / STAGE / key
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        fetch(folder / SPACE_FILE)  # a search started from another node: its space is in the bucket
    check_search_space(folder, spec)  # before any compute
    atomic_write_json(folder / "inputs.json", shared)
    return key, folder


def _validation_split(tc: TuneConfig, train_table: Path, folder: Path) -> tuple[list[str], Path, int]:
    """The held-out samples (the same for every rho), written once. Returns (ids, table, n_train)."""
    ids = pq.read_table(train_table, columns=["sample_id"]).column("sample_id").to_pylist()
    val_mask = in_validation(ids, tc.val_fraction, tc.seed)
    val_ids = [s for s, v in zip(ids, val_mask) if v]
    if tc.val_fraction > 0 and not val_ids:
        raise TuneInputError(f"tune.val_fraction={tc.val_fraction} selects none of the {len(ids)} samples of "
                             f"{train_table}; raise it")
    val_table = folder / VAL_FILE
    with contextlib.suppress(FileNotFoundError):
        fetch(val_table)  # written by an earlier run of this search, perhaps on another node
    if val_ids and not val_table.is_file():
        tbl = pq.read_table(train_table)
        with atomic_path(val_table) as tmp:
            pq.write_table(tbl.filter(pc.is_in(tbl.column("sample_id"), value_set=pa.array(val_ids, pa.string()))), tmp)
    return val_ids, val_table, len(ids) - len(val_ids)


def _data_plan(cfg: PipelineConfig, train_table: Path, n_train: int, objective: str) -> DataPlan:
    tr = cfg.training
    plan = DataPlan(n_train, cfg.resources.num_workers, tr.micro_batch_size, tr.grad_accum, tr.epochs, tr.max_steps)
    try:
        plan.check(f"{train_table} without its validation split")
    except ValueError as e:
        raise TuneInputError(str(e)) from None
    if objective == "val_nll" and plan.num_epochs > 1:
        log.warning("tune: %d epochs; online_nll (ASHA's signal) is a held-out estimate only in the first epoch",
                    plan.num_epochs)
    return plan


def _scheduler(tc: TuneConfig, plan: DataPlan):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if tc.scheduler != "asha":
        return FIFOScheduler()
    max_t = plan.total_steps + 1  # the final report (step = total_steps) must not count as "reached max_t"
    return ASHAScheduler(time_attr="step", metric=ONLINE_METRIC, mode="min", max_t=max_t,
                         grace_period=min(tc.grace_period, plan.total_steps), reduction_factor=tc.reduction_factor)


def _searcher(tc: TuneConfig, mode: str, concurrent: int):
    if tc.searcher == "optuna":
        return _optuna_on_final_objective(mode, tc.seed, concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=tc.seed, max_concurrent=concurrent)


def _optuna_on_final_objective(mode: str, seed: int, max_concurrent: int):
    """Optuna that learns from each trial's final objective only.

    A trial's intermediate reports carry ASHA's online NLL, not the objective (an eval score or a
    validation NLL exists only once the model is trained), so Tune's controller must not demand the
    objective in every report and Optuna (no pruner here) gets no intermediate values.  A trial ASHA
    stops ends without an objective, which Optuna records as pruned.
    """
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    class FinalObjectiveOnly(ConcurrencyLimiter):
        def __init__(self):
            super().__init__(OptunaSearch(metric=OBJECTIVE_METRIC, mode=mode, seed=seed), max_concurrent)
            self._metric = None  # the key Tune's controller checks every report for

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            pass

    return FinalObjectiveOnly()


def _param_space(tc: TuneConfig) -> dict[str, Any]:
    from ray import tune

    def rng(r):
        return tune.loguniform(r.low, r.high) if r.log else tune.uniform(r.low, r.high)

    space = {"rho": rng(tc.rho), "t_max": rng(tc.t_max), "lambda_schedule": tune.choice(list(tc.lambda_schedules))}
    if tc.t_min is not None:
        space["t_min"] = rng(tc.t_min)
    if tc.lr is not None:
        space["lr"] = rng(tc.lr)
    return space


def _fit(tc: TuneConfig, folder: Path, ctx: dict[str, Any], scheduler, search_alg, trial_tracker,
         placement_timeout_s: float, mode: str):
    """Run the search (or resume an interrupted one in the same folder).

    Returns (result grid, experiment folder, {trial id: restarts after its process died}).
    """
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), {"cpu": TRIAL_CPUS})
    reaper = reaper_class()()
    storage = portable(folder / "ray")  # trials on other nodes write there too: the bucket of a bucket run
    watch = tune_callback(PendingTrialWatch, placement_timeout_s)
    progress = tune_callback(TrialProgress, tc.num_samples, mode)
    # quiet: the bar instead of Tune's status tables
    run_config = tune.RunConfig(name="search", storage_path=storage, verbose=0 if quiet() else 1,
                                callbacks=[reaper, trial_tracker, watch, progress],
                                failure_config=tune.FailureConfig(max_failures=tc.max_trial_failures))
    experiment = join_storage(storage, "search")
    if tune.Tuner.can_restore(str(experiment)):
        log.info("tune: resuming the search in %s", experiment)
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, param_space=_param_space(tc),
                                   resume_unfinished=True, restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=_param_space(tc), run_config=run_config,
            tune_config=tune.TuneConfig(num_samples=tc.num_samples, scheduler=scheduler, search_alg=search_alg,
                                        reuse_actors=False),  # a stopped trial's fit must die with its actor
        )
    try:
        with working_in(folder):
            grid = tuner.fit()
    except Exception as e:  # Tune wraps what a callback raises; the placement timeout is the user's to fix
        cause = e
        while cause is not None and not isinstance(cause, PlacementTimeout):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None
    reaper.join()
    return grid, experiment, reaper.restarts


def _collect_trials(grid, restarts: dict[str, int]) -> list[dict[str, Any]]:
    """One record per trial, by trial id: finished (has the objective), stopped (by the scheduler) or error, and
    how many times Tune restarted it after its process died (``tune.max_trial_failures``)."""
    trials = []
    for r in grid:
        m = r.metrics or {}
        status = "error" if r.error else ("finished" if OBJECTIVE_METRIC in m else "stopped")
        trial_id = m.get("trial_id") or Path(r.path).name
        trials.append({"trial_id": trial_id, "config": dict(r.config or {}), "restarts": restarts.get(trial_id, 0),
                       "status": status, "objective": m.get(OBJECTIVE_METRIC), "last_step": m.get("step"),
                       ONLINE_METRIC: m.get(ONLINE_METRIC), "out_dir": m.get("out_dir"),
                       "partition_dir": m.get("partition_dir"), "train_table": m.get("train_table_used"),
                       "node_id": m.get("node_id"),
                       "error": str(r.error) if r.error else None})
    trials.sort(key=lambda x: x["trial_id"])
    return trials


def _finish(result: TuneResult, cfg: PipelineConfig, train_table: Path, score: Any, experiment: Path,
            tracker: Any) -> TuneResult:
    """Write ``result.json``; load the best trial's config, model and partition and log them."""
    best, trials = result.best, result.trials
    atomic_write_json(result.dir / "result.json", {"objective": result.objective, "mode": result.mode,
                                                   "space_hash": result.space_hash, "best": best, "trials": trials})
    if best is None:
        raise RuntimeError(f"tune: no trial finished with an objective ({len(trials)} trials; see {experiment})")
    result.best_config = trial_config(cfg, best["config"])
    result.best_train = load_trial_result(best["out_dir"], cfg)
    result.best_partition = run_partition(result.best_config, train_table, score.dir)  # cached by the trial
    result.best_table = fetch(local_path(best["train_table"], cfg.run_dir))
    tracker.log_metrics({"best_objective": best["objective"], "trials_stopped_early": result.n_stopped_early,
                         "trials_finished": sum(t["status"] == "finished" for t in trials)})
    tracker.log_params({f"best.{k}": v for k, v in sorted(best["config"].items())} | {"best.trial_id": best["trial_id"]})
    tracker.log_artifact(result.dir / "result.json")
    return result


def _fit_trial_eval(cfg: PipelineConfig, objective: str, ray) -> PipelineConfig:
    """A trial evaluates while it holds TRIAL_CPUS on one node: the trials' eval pool is cut to the largest
    concurrency that leaves Ray Data a whole CPU beside the trial (on a 2-CPU laptop one actor instead of two);
    refused, before any trial starts, only when not even one actor fits (the trial would wait forever)."""
    if objective != "eval_mean" or cfg.eval.backend != "ray":
        return cfg
    nodes = sorted(alive_node_cpus(ray), reverse=True)
    if nodes:
        nodes[0] = max(0.0, nodes[0] - TRIAL_CPUS)
    if not starves_ray_data(cfg.eval, nodes):
        return cfg
    fits = largest_fitting_concurrency(cfg.eval, nodes)
    if not fits:
        raise TuneInputError(f"inside a trial (which holds {TRIAL_CPUS:g} CPU): "
                             + describe_pool_problem("eval", cfg.eval, nodes))
    log.info("tune: each trial evaluates with eval.concurrency=%d (of %d) to fit beside the trial on nodes of %s "
             "CPUs", fits, cfg.eval.concurrency, ", ".join(f"{c:g}" for c in alive_node_cpus(ray)))
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"concurrency": fits})})


def run_tune(cfg: PipelineConfig, train_table: Path, score, tracker: Any) -> TuneResult:
    """Search rho and the lambda schedule on the cached ``score`` (a ScoreResult); return the best trial."""
    import ray

    tc = cfg.tune
    objective = resolve_objective(cfg)
    mode = objective_mode(objective)
    spec = space_spec(tc)
    key, folder = _open_search_folder(cfg, score, objective, spec)
    val_ids, val_table, n_train = _validation_split(tc, train_table, folder)
    plan = _data_plan(cfg, train_table, n_train, objective)

    init_ray(cfg.resources.ray_address)
    cfg = _fit_trial_eval(cfg, objective, ray)
    check_worker_group(ray, cfg.resources, error=TuneInputError, held_cpus=TRIAL_CPUS)
    scheduler = _scheduler(tc, plan)
    concurrent = tc.max_concurrent_trials or default_max_concurrent(cfg, ray.cluster_resources())
    search_alg = _searcher(tc, mode, concurrent)
    tracker = tracker if tracker is not None else Tracker.disabled()
    report_every = tc.report_every or cfg.training.report_every
    # portable locations: a trial may run on a node that sees the run only through its bucket
    ctx = {"cfg": cfg, "dir": portable(folder), "train_table": portable(Path(train_table).resolve()),
           "score_dir": portable(Path(score.dir).resolve()), "score_key": score.key, "val_ids": val_ids,
           "val_table": portable(val_table), "objective": objective, "eval_limit": tc.eval_limit,
           "report_every": report_every}
    tracker.log_params({"tune.key": key, "tune.space_hash": space_hash(spec), "tune.objective_resolved": objective,
                        "tune.max_concurrent_trials_resolved": concurrent, "tune.total_steps": plan.total_steps,
                        "tune.val_samples": len(val_ids)})
    trial_tracker = tune_callback(TrialTracker, tracker, cfg, report_every, score.key)
    grid, experiment, restarts = _fit(tc, folder, ctx, scheduler, search_alg, trial_tracker,
                                      cfg.resources.placement_timeout_s, mode)

    trials = _collect_trials(grid, restarts)
    tracker.close_trial_runs(stopped=[t["trial_id"] for t in trials if t["status"] == "stopped"],
                             errored=[t["trial_id"] for t in trials if t["status"] == "error"], restarts=restarts)
    result = TuneResult(folder, key, space_hash(spec), objective, mode, trials, pick_best(trials, mode),
                        stats={"max_concurrent_trials": concurrent, "total_steps": plan.total_steps,
                               "val_samples": len(val_ids)}, trial_runs=dict(trial_tracker.run_ids))
    return _finish(result, cfg, train_table, score, experiment, tracker)


def format_tune_summary(result: TuneResult) -> str:
    """A printable table of the trials and the best configuration."""
    keys = sorted({k for t in result.trials for k in t["config"]})
    lines = [f"Tune search {result.dir} (space {result.space_hash}, objective {result.objective}, {result.mode})",
             "| trial | " + " | ".join(keys) + " | status | restarts | last step | online_nll | objective |",
             "|" + "---|" * (len(keys) + 6)]

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))

    for t in result.trials:
        lines.append(f"| {t['trial_id']} | " + " | ".join(fmt(t["config"].get(k)) for k in keys)
                     + f" | {t['status']} | {t.get('restarts', 0)} | {fmt(t['last_step'])} | {fmt(t[ONLINE_METRIC])}"
                     + f" | {fmt(t['objective'])} |")
    if result.best:
        lines += ["", f"best: trial {result.best['trial_id']} objective {result.best['objective']:.6g} "
                      + json.dumps(result.best["config"], sort_keys=True),
                  f"best model: {result.best_export_dir}"]
    return "\n".join(lines)
