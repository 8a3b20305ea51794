"""TUNE stage: a Ray Tune search over rho and the lambda schedule (name, t_max, t_min, optionally lr).

Recipe (``run_tune``): resolve the objective -> key the search folder by what every trial shares
(scores, base training settings, validation split) and refuse a restart whose search space
changed -> hold out a seeded validation split of the samples -> build the space, the searcher
(random | Optuna) and the scheduler (ASHA | FIFO) -> ``Tuner.fit`` (or restore) -> pick the best
finished trial -> close the MLflow runs of the trials the scheduler stopped.

A trial (``_trial``, a function trainable: the Ray Train V2 pattern, not ``Tuner(trainer)``)
re-partitions the cached scores with its rho (``run_partition``; the scores are never recomputed:
their key does not depend on rho or lambda), drops the validation samples, trains with the
forgetting strategy through ``run_finetune`` (its own ``TorchTrainer``), and reports:

* every training report, through :class:`TrialReportCallback`, with ``online_nll``: the NLL of all
  response tokens of the step's micro-batches, measured by the forward pass *before* the update
  that uses them (progressive validation: in the first epoch those samples are unseen).  ASHA
  compares trials on it at its rungs, so it can stop a trial long before the objective exists;
* once, after training, ``objective``: the mean eval score on the seeded dev subset, or the NLL of
  every response token of the held-out validation split under the exported model.

The maths (space description and hash, trial configs, online NLL, the split, best-trial choice)
is plain functions, testable without Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import PipelineConfig, TuneConfig, config_to_dict
from .constants import IGNORE_INDEX
from .errors import UserError
from .store import atomic_path, atomic_write_json, content_hash

log = logging.getLogger(__name__)

STAGE = "tune"
SPACE_FILE = "search_space.json"
VAL_FILE = "val.parquet"
ONLINE_METRIC = "online_nll"  # what ASHA compares at its rungs (lower is better)
OBJECTIVE_METRIC = "objective"  # what the searcher and the best-trial choice use


class TuneInputError(UserError, ValueError):
    """A search that cannot run as configured (objective without its data, empty split, ...)."""


class SearchSpaceMismatch(UserError, RuntimeError):
    """A Tune run restarted in the same folder with a different search space."""


# ------------------------------------------------------------------------------------------
# pure helpers
# ------------------------------------------------------------------------------------------
def resolve_objective(cfg: PipelineConfig) -> str:
    """'auto' -> eval_mean when evaluation is on, else val_nll; checks each has what it needs."""
    objective = cfg.tune.objective
    if objective == "auto":
        objective = "eval_mean" if cfg.eval.enabled else "val_nll"
    if objective == "val_nll" and cfg.tune.val_fraction <= 0:
        raise TuneInputError("tune.objective is val_nll but tune.val_fraction is 0: set tune.val_fraction > 0 "
                             "(e.g. 0.1) to hold out a validation split")
    if objective == "eval_mean" and not cfg.eval.tasks:
        raise TuneInputError("tune.objective is eval_mean but eval.tasks is empty")
    return objective


def objective_mode(objective: str) -> str:
    return "max" if objective == "eval_mean" else "min"


def space_spec(tc: TuneConfig) -> dict[str, Any]:
    """The search as data: ranges, schedules, searcher, scheduler, objective and seed.

    ``enabled`` and ``max_concurrent_trials`` are left out: they change how fast the search runs,
    not what it searches, so a restart may change them.
    """
    d = config_to_dict(tc)
    return {k: v for k, v in sorted(d.items()) if k not in ("enabled", "max_concurrent_trials")}


def space_hash(spec: dict[str, Any]) -> str:
    return content_hash(spec)


def check_search_space(folder: str | Path, spec: dict[str, Any]) -> None:
    """Record the space on the first run; a restart with another space is an error naming both hashes."""
    path = Path(folder) / SPACE_FILE
    new = space_hash(spec)
    if path.is_file():
        old_doc = json.loads(path.read_text())
        old = old_doc.get("hash")
        if old != new:
            changed = sorted(k for k in set(old_doc.get("spec", {})) | set(spec)
                             if old_doc.get("spec", {}).get(k) != spec.get(k))
            raise SearchSpaceMismatch(
                f"Tune search in {path.parent} was started with search space {old}; this configuration's "
                f"space is {new} (changed: tune.{', tune.'.join(changed)}). A restart resumes the old "
                f"search, so it must keep the space: restore the old tune settings, or start a fresh "
                f"search by deleting {path.parent} or choosing another run_dir."
            )
        return
    atomic_write_json(path, {"hash": new, "spec": spec})


def trial_config(cfg: PipelineConfig, params: dict[str, Any], *, report_every: int | None = None) -> PipelineConfig:
    """The pipeline config of one trial: the base config with the drawn rho, schedule, t_max, t_min, lr.

    The strategy is always 'forgetting' (the search tunes its knobs); a drawn t_min above the drawn
    t_max is clipped to it, so every point of the box is a valid schedule.
    """
    t_max = float(params.get("t_max", cfg.training.t_max))
    t_min = min(float(params.get("t_min", cfg.training.t_min)), t_max)
    training = {
        "strategy": "forgetting",
        "lambda_schedule": params.get("lambda_schedule", cfg.training.lambda_schedule),
        "t_max": t_max,
        "t_min": t_min,
        "lr": float(params.get("lr", cfg.training.lr)),
    }
    if report_every is not None:
        training["report_every"] = report_every
    data = config_to_dict(cfg)
    data["training"].update(training)
    data["selection"]["rho"] = float(params.get("rho", cfg.selection.rho))
    return PipelineConfig.model_validate(data)


def online_nll(metrics: dict[str, Any]) -> float | None:
    """NLL of every response token of a step, from its per-class means and counts (None if empty)."""
    n_pos, n_neg = float(metrics.get("n_pos", 0)), float(metrics.get("n_neg", 0))
    if n_pos + n_neg <= 0:
        return None
    total = float(metrics.get("pos_nll", 0.0)) * n_pos + float(metrics.get("neg_nll", 0.0)) * n_neg
    return total / (n_pos + n_neg)


def in_validation(sample_ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Seeded membership of the validation split, from the sample id alone (stable across rho and runs)."""
    if fraction <= 0:
        return np.zeros(len(sample_ids), dtype=bool)
    cut = int(fraction * 2**64)
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{s}".encode(), digest_size=8).digest(), "big") < cut
                     for s in sample_ids], dtype=bool)


def default_max_concurrent(cfg: PipelineConfig, cluster: dict[str, float]) -> int:
    """How many trials the cluster holds at once: each needs num_workers x (cpus_per_worker [+ 1 GPU])."""
    r = cfg.resources
    per_trial_cpu = r.num_workers * r.cpus_per_worker + 0.1  # + the trial's own driver
    n = int(cluster.get("CPU", 0) // per_trial_cpu)
    if r.use_gpu:
        n = min(n, int(cluster.get("GPU", 0) // r.num_workers))
    return max(1, n)


def pick_best(trials: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The finished trial with the best finite objective (ties: the earlier trial id)."""
    done = [t for t in trials if t.get("objective") is not None and math.isfinite(t["objective"])]
    if not done:
        return None
    sign = -1.0 if mode == "max" else 1.0
    return min(done, key=lambda t: (sign * t["objective"], t["trial_id"]))


# ------------------------------------------------------------------------------------------
# validation NLL (runs in a Ray task sized like an eval actor)
# ------------------------------------------------------------------------------------------
def validation_nll(model_dir: str, val_table: str, *, model_cfg: dict[str, Any], batch_tokens: int,
                   chunk_size: int | None = None) -> dict[str, float]:
    """Mean NLL of every response token of ``val_table`` under the model in ``model_dir``."""
    import pyarrow.parquet as pq
    import torch

    from .config import ModelConfig
    from .data.collate import collate
    from .models import load_model, load_tokenizer
    from .scoring import token_nll
    from .stages.evaluate import resolve_eval_model
    from .stages.score import plan_batches

    path = resolve_eval_model(model_dir)
    mc = ModelConfig.model_validate({**model_cfg, "name_or_path": path, "tokenizer": None, "revision": None})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(mc)
    model = load_model(mc, device=device).eval()
    tbl = pq.read_table(val_table, columns=["input_ids", "labels"])
    ids = [np.asarray(x) for x in tbl.column("input_ids").to_pylist()]
    labels = [np.asarray(x) for x in tbl.column("labels").to_pylist()]
    total, count = 0.0, 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.inference_mode():
        for rows in plan_batches(np.array([len(x) for x in ids]), batch_tokens):
            b = collate({"input_ids": [ids[i] for i in rows], "labels": [labels[i] for i in rows]}, pad)
            b = {k: v.to(device) for k, v in b.items()}
            nll = token_nll(model, b["input_ids"], b["attention_mask"], b["labels"], chunk_size=chunk_size)
            mask = b["labels"] != IGNORE_INDEX
            mask[:, 0] = False  # position 0 is never predicted
            total += float(nll[mask].double().sum())
            count += int(mask.sum())
    if count == 0:
        raise TuneInputError(f"validation split {val_table} has no response tokens")
    return {"val_nll": total / count, "val_tokens": count}


# ------------------------------------------------------------------------------------------
# Ray glue
# ------------------------------------------------------------------------------------------
def _report_callback_class():
    from ray.tune.integration.ray_train import TuneReportCallback

    class TrialReportCallback(TuneReportCallback):
        """Forwards rank 0's training reports to Tune with ``online_nll`` added; logs them to the trial's run.

        Runs in the Ray Train controller of the trial's fit.  ``online_nll`` is averaged over the last
        ``window`` reports, so one unlucky micro-batch does not decide a rung.
        """

        def __init__(self, tracker: Any = None, window: int = 2):
            super().__init__()
            self.tracker = tracker
            self.recent: deque[float] = deque(maxlen=window)

        def after_report(self, run_context, metrics, checkpoint):
            m = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            value = online_nll(m)
            if value is not None and math.isfinite(value):
                self.recent.append(value)
                m["online_nll_step"] = value
            if self.recent:
                m[ONLINE_METRIC] = float(np.mean(self.recent))
            if self.tracker is not None:
                try:
                    self.tracker.log_metrics({k: v for k, v in m.items() if k != "step"}, step=int(m.get("step", 0)))
                except Exception as e:  # noqa: BLE001 - a tracking hiccup must not kill the trial
                    log.warning("trial metrics not logged to MLflow: %s", e)
            super().after_report(run_context, [m], checkpoint)

    return TrialReportCallback


PG_KV_NAMESPACE = "forgetting_ray_tune"


def _pg_recorder_class():
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class PlacementGroupRecorder(WorkerGroupCallback):
        """Records (trial, controller, worker placement group) in Ray's KV store, for :class:`TrialReaper`.

        A trial that ASHA stops is killed mid-fit, and its Train controller dies with it.  Ray Train's
        own detached cleaner then removes the workers' placement group, but it finds the cluster
        through the State API, which fails where several Ray instances share a host; a leaked group
        holds its CPUs/GPUs for the rest of the search.  This record lets the driver reap it.
        """

        def __init__(self, trial_id: str):
            self.trial_id = trial_id

        def after_worker_group_start(self, worker_group) -> None:
            import ray
            from ray.experimental.internal_kv import _internal_kv_put

            try:
                pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
                value = json.dumps({"pg": pg.id.hex(), "controller": ray.get_runtime_context().get_actor_id()})
                _internal_kv_put(self.trial_id, value, overwrite=True, namespace=PG_KV_NAMESPACE)
            except Exception as e:  # noqa: BLE001 - bookkeeping must never fail a trial
                log.warning("could not record the placement group of trial %s: %s", self.trial_id, e)

    return PlacementGroupRecorder


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


def _reaper_class():
    import threading

    from ray.tune import Callback

    class TrialReaper(Callback):
        """Driver side: once a finished or stopped trial's Train controller is dead, remove its workers'
        placement group if it is still there (a no-op wherever Ray Train's own cleaner worked)."""

        def __init__(self, wait_s: float = 120.0):
            self.wait_s = wait_s
            self.threads: list[threading.Thread] = []

        def _reap(self, trial_id: str) -> None:
            import time

            import ray
            from ray._private.state import actors
            from ray.experimental.internal_kv import _internal_kv_get
            from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

            deadline = time.monotonic() + self.wait_s
            while time.monotonic() < deadline:
                raw = _internal_kv_get(trial_id, namespace=PG_KV_NAMESPACE)
                if raw is not None:
                    rec = json.loads(raw)
                    if actors(rec["controller"]).get("State") == "DEAD":
                        if placement_group_table().get(rec["pg"], {}).get("state") not in (None, "REMOVED"):
                            log.info("tune: removing the placement group %s left by trial %s", rec["pg"], trial_id)
                            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(rec["pg"]))))
                        return
                time.sleep(0.5)

        def _start(self, trial) -> None:
            th = threading.Thread(target=self._reap, args=(trial.trial_id,), daemon=True)
            th.start()
            self.threads.append(th)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._start(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._start(trial)

        def join(self) -> None:
            for th in self.threads:
                th.join()

    return TrialReaper


@dataclass
class TuneResult:
    dir: Path
    key: str
    space_hash: str
    objective: str
    mode: str
    trials: list[dict[str, Any]]  # trial_id, config, status, objective, last step, out_dir, ...
    best: dict[str, Any] | None
    best_config: PipelineConfig | None = None
    best_train: Any = None  # FinetuneResult of the best trial
    best_partition: Any = None  # PartitionResult at the best rho
    best_table: Path | None = None  # the table the best trial trained on (validation split removed)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def best_export_dir(self) -> Path | None:
        return self.best_train.export_dir if self.best_train is not None else None

    @property
    def n_stopped_early(self) -> int:
        return sum(t["status"] == "stopped" for t in self.trials)


def _trial_tables(part, val_ids: set[str], folder: Path) -> Path:
    """The partitioned table at this rho minus the validation samples (written once per rho)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

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


def finetune_plots(t, res, training=None) -> None:
    """Loss curves (and, for the forgetting strategy, the lambda schedule) of a fine-tune, logged to ``t``."""
    from .report.plots import lambda_schedule_plot, loss_curves

    plots = Path(res.out_dir) / "plots"
    if training is not None and training.strategy == "forgetting":
        applied = [(int(m["step"]) - 1, float(m["lambda"])) for m in res.metrics if "lambda" in m]
        lambda_schedule_plot(training.lambda_schedule, t_max=training.t_max, t_min=training.t_min,
                             total_steps=max(1, res.total_steps), path=plots / "lambda_schedule.png", applied=applied)
        t.log_artifact(plots / "lambda_schedule.png", "plots")
    if res.metrics:
        strategy = training.strategy if training is not None else "sft"
        loss_curves(res.metrics, plots / "loss_curves.png", title=f"{res.stage} ({strategy})")
        t.log_artifact(plots / "loss_curves.png", "plots")


def _trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One trial: re-partition with its rho, train with its schedule, report the objective."""
    import ray.tune

    from .stages.evaluate import run_eval
    from .stages.partition import run_partition
    from .stages.train import run_finetune
    from .store import tree_sha256

    base = PipelineConfig.model_validate(ctx["cfg"])
    cfg = trial_config(base, params, report_every=ctx["report_every"])
    trial_id = ray.tune.get_context().get_trial_id()
    folder = Path(ctx["dir"])
    parent = ctx["tracker"]
    t = parent.child(f"trial-{trial_id}", {"forgetting_ray.stage": "tune-trial", "forgetting_ray.trial_id": trial_id})
    try:
        t.log_params({"trial_id": trial_id, **{f"search.{k}": v for k, v in sorted(params.items())},
                      "selection.rho": cfg.selection.rho, "training.lambda_schedule": cfg.training.lambda_schedule,
                      "training.t_max": cfg.training.t_max, "training.t_min": cfg.training.t_min,
                      "training.lr": cfg.training.lr, "training.strategy": cfg.training.strategy})
        part = run_partition(cfg, Path(ctx["train_table"]), Path(ctx["score_dir"]))
        table = _trial_tables(part, set(ctx["val_ids"]), folder / "tables")
        t.log_params({"partition_key": part.key, "score_key": ctx["score_key"], "train_table": str(table)})
        callbacks = [_report_callback_class()(t), _pg_recorder_class()(trial_id)]
        res = run_finetune(cfg, "train", table, folder / "trials" / trial_id, callbacks=callbacks)
        if res.export_dir is None:
            raise RuntimeError(f"trial {trial_id} stopped without an export: {res.stop_reason}")
        final: dict[str, Any] = {"step": res.total_steps, "trained": 1}
        if ctx["objective"] == "val_nll":
            kwargs = {"model_cfg": config_to_dict(base.model), "batch_tokens": base.scoring.batch_tokens,
                      "chunk_size": base.scoring.chunk_size}
            if base.eval.num_gpus_per_actor > 0:  # a GPU task outside the trial's 0.1-CPU placement group
                import ray

                task = ray.remote(validation_nll).options(num_cpus=base.eval.num_cpus_per_actor,
                                                            num_gpus=base.eval.num_gpus_per_actor,
                                                            scheduling_strategy="DEFAULT")
                v = ray.get(task.remote(str(res.export_dir), ctx["val_table"], **kwargs))
            else:  # on CPU here: the trial process has torch loaded and its fit has released the workers
                v = validation_nll(str(res.export_dir), ctx["val_table"], **kwargs)
            final.update(v)
            final[OBJECTIVE_METRIC] = v["val_nll"]
        else:
            ecfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={
                "limit": float(ctx["eval_limit"]), "limit_mode": "random"})})
            ev = run_eval(ecfg, str(res.export_dir), folder / "eval" / trial_id, tracker=t)
            final.update({f"eval.{k}": v for k, v in ev.headline.items()})
            # the mean over the tasks this search evaluates (ev.average is None unless all five ran)
            final["eval_mean"] = float(np.mean([ev.headline[task] for task in cfg.eval.tasks]))
            final[OBJECTIVE_METRIC] = final["eval_mean"]
        online = [online_nll(m) for m in res.metrics[-2:]]
        online = [x for x in online if x is not None]
        if online:
            final[ONLINE_METRIC] = float(np.mean(online))
        t.log_metrics({k: v for k, v in final.items() if k != "step"}, step=res.total_steps)
        finetune_plots(t, res, cfg.training)
        t.log_model_reference("trial", res.export_dir, tree_sha256(res.export_dir), upload=False)
        t.end("FINISHED")
        ray.tune.report({**final, "out_dir": str(res.out_dir), "partition_dir": str(part.dir),
                         "train_table_used": str(table)})
    except BaseException:
        t.end("FAILED")
        raise


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


def run_tune(cfg: PipelineConfig, train_table: Path, score, tracker: Any) -> TuneResult:
    """Search rho and the lambda schedule on the cached ``score`` (a ScoreResult); return the best trial."""
    import pyarrow.parquet as pq
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from .ray_utils import init_ray
    from .stages.evaluate import eval_data_fingerprint
    from .stages.partition import run_partition
    from .stages.train import load_result
    from .tracking import Tracker
    from .train.loop import DataPlan

    tc = cfg.tune
    objective = resolve_objective(cfg)
    mode = objective_mode(objective)
    spec = space_spec(tc)
    shared = {"score_key": score.key, "model": config_to_dict(cfg.model), "resources": cfg.resources.num_workers,
              "training": {k: v for k, v in config_to_dict(cfg.training).items()
                           if k not in ("strategy", "lambda_schedule", "t_max", "t_min", "lr", "report_every")},
              "val": [tc.val_fraction, tc.seed], "objective": objective,
              "eval": config_to_dict(cfg.eval) if objective == "eval_mean" else None,
              "eval_data": eval_data_fingerprint(cfg.eval) if objective == "eval_mean" else None}
    key = content_hash(shared)
    folder = (Path(cfg.run_dir) / STAGE / key).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    check_search_space(folder, spec)  # before any compute
    atomic_write_json(folder / "inputs.json", shared)

    # --- validation split (same samples for every rho) -----------------------------------------
    ids = pq.read_table(train_table, columns=["sample_id"]).column("sample_id").to_pylist()
    val_mask = in_validation(ids, tc.val_fraction, tc.seed)
    val_ids = [s for s, v in zip(ids, val_mask) if v]
    n_train = len(ids) - len(val_ids)
    if tc.val_fraction > 0 and not val_ids:
        raise TuneInputError(f"tune.val_fraction={tc.val_fraction} selects none of the {len(ids)} samples of "
                             f"{train_table}; raise it")
    val_table = folder / VAL_FILE
    if val_ids and not val_table.is_file():
        import pyarrow as pa
        import pyarrow.compute as pc

        tbl = pq.read_table(train_table)
        with atomic_path(val_table) as tmp:
            pq.write_table(tbl.filter(pc.is_in(tbl.column("sample_id"), value_set=pa.array(val_ids, pa.string()))), tmp)
    tr = cfg.training
    plan = DataPlan(n_train, cfg.resources.num_workers, tr.micro_batch_size, tr.grad_accum, tr.epochs, tr.max_steps)
    try:
        plan.check(f"{train_table} without its validation split")
    except ValueError as e:
        raise TuneInputError(str(e)) from None
    if objective == "val_nll" and plan.num_epochs > 1:
        log.warning("tune: %d epochs; online_nll (ASHA's signal) is a held-out estimate only in the first epoch",
                    plan.num_epochs)

    # --- searcher, scheduler, resources --------------------------------------------------------
    init_ray(cfg.resources.ray_address)
    max_t = plan.total_steps + 1  # the final report (step = total_steps) must not count as "reached max_t"
    if tc.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", metric=ONLINE_METRIC, mode="min", max_t=max_t,
                                  grace_period=min(tc.grace_period, plan.total_steps),
                                  reduction_factor=tc.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    concurrent = tc.max_concurrent_trials or default_max_concurrent(cfg, ray.cluster_resources())
    if tc.searcher == "optuna":
        search_alg = _optuna_on_final_objective(mode, tc.seed, concurrent)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=tc.seed, max_concurrent=concurrent)
    tracker = tracker if tracker is not None else Tracker.disabled()
    ctx = {"cfg": config_to_dict(cfg), "dir": str(folder), "train_table": str(Path(train_table).resolve()),
           "score_dir": str(Path(score.dir).resolve()), "score_key": score.key, "val_ids": val_ids,
           "val_table": str(val_table), "objective": objective, "eval_limit": tc.eval_limit,
           "report_every": tc.report_every or tr.report_every, "tracker": tracker}
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), {"cpu": 0.1})
    reaper = _reaper_class()()
    run_config = tune.RunConfig(name="search", storage_path=str(folder / "ray"), verbose=1, callbacks=[reaper])
    experiment = folder / "ray" / "search"
    tracker.log_params({"tune.key": key, "tune.space_hash": space_hash(spec), "tune.objective_resolved": objective,
                        "tune.max_concurrent_trials_resolved": concurrent, "tune.total_steps": plan.total_steps,
                        "tune.val_samples": len(val_ids)})
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
    grid = tuner.fit()
    reaper.join()

    # --- results ------------------------------------------------------------------------------
    trials = []
    for r in grid:
        m = r.metrics or {}
        status = "error" if r.error else ("finished" if OBJECTIVE_METRIC in m else "stopped")
        trials.append({"trial_id": m.get("trial_id") or Path(r.path).name, "config": dict(r.config or {}),
                       "status": status, "objective": m.get(OBJECTIVE_METRIC), "last_step": m.get("step"),
                       ONLINE_METRIC: m.get(ONLINE_METRIC), "out_dir": m.get("out_dir"),
                       "partition_dir": m.get("partition_dir"), "train_table": m.get("train_table_used"),
                       "error": str(r.error) if r.error else None})
    trials.sort(key=lambda x: x["trial_id"])
    _close_stopped_runs(tracker, trials)
    best = pick_best(trials, mode)
    result = TuneResult(folder, key, space_hash(spec), objective, mode, trials, best,
                        stats={"max_concurrent_trials": concurrent, "total_steps": plan.total_steps,
                               "val_samples": len(val_ids)})
    atomic_write_json(folder / "result.json", {"objective": objective, "mode": mode, "space_hash": result.space_hash,
                                               "best": best, "trials": trials})
    if best is None:
        raise RuntimeError(f"tune: no trial finished with an objective ({len(trials)} trials; see {experiment})")
    result.best_config = trial_config(cfg, best["config"])
    result.best_train = load_result(best["out_dir"])
    result.best_partition = run_partition(result.best_config, train_table, score.dir)  # cached by the trial
    result.best_table = Path(best["train_table"])
    tracker.log_metrics({"best_objective": best["objective"], "trials_stopped_early": result.n_stopped_early,
                         "trials_finished": sum(t["status"] == "finished" for t in trials)})
    tracker.log_params({f"best.{k}": v for k, v in sorted(best["config"].items())} | {"best.trial_id": best["trial_id"]})
    tracker.log_artifact(folder / "result.json")
    return result


def _close_stopped_runs(tracker: Any, trials: list[dict[str, Any]]) -> None:
    """Trials the scheduler stopped were killed mid-fit: mark their MLflow runs KILLED, not RUNNING.

    A kill that lands inside the trial's own tracking context can leave the run FAILED first (a race
    with the trial's teardown); the scheduler's decision is what happened, so that becomes KILLED too.
    """
    if not getattr(tracker, "enabled", False):
        return
    stopped = {t["trial_id"] for t in trials if t["status"] == "stopped"}
    errored = {t["trial_id"] for t in trials if t["status"] == "error"}
    runs = tracker.client.search_runs([tracker.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{tracker.run_id}'")
    for run in runs:
        tid = run.data.tags.get("forgetting_ray.trial_id")
        if run.info.status in ("RUNNING", "FAILED") and tid in stopped:
            tracker.client.set_terminated(run.info.run_id, status="KILLED")
            tracker.client.set_tag(run.info.run_id, "forgetting_ray.stopped_by", "scheduler")
        elif run.info.status == "RUNNING" and tid in errored:
            tracker.client.set_terminated(run.info.run_id, status="FAILED")


def format_tune_summary(result: TuneResult) -> str:
    """A printable table of the trials and the best configuration."""
    keys = sorted({k for t in result.trials for k in t["config"]})
    lines = [f"Tune search {result.dir} (space {result.space_hash}, objective {result.objective}, {result.mode})",
             "| trial | " + " | ".join(keys) + " | status | last step | online_nll | objective |",
             "|" + "---|" * (len(keys) + 5)]

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))

    for t in result.trials:
        lines.append(f"| {t['trial_id']} | " + " | ".join(fmt(t["config"].get(k)) for k in keys)
                     + f" | {t['status']} | {fmt(t['last_step'])} | {fmt(t[ONLINE_METRIC])} | {fmt(t['objective'])} |")
    if result.best:
        lines += ["", f"best: trial {result.best['trial_id']} objective {result.best['objective']:.6g} "
                      + json.dumps(result.best["config"], sort_keys=True),
                  f"best model: {result.best_export_dir}"]
    return "\n".join(lines)


def run_tune_command(cfg: PipelineConfig) -> int:
    """``forgetting-ray tune CONFIG``: prepare -> reference -> score -> partition -> tune; prints the summary."""
    from .pipeline import run_pipeline

    cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"enabled": True})})
    result = run_pipeline(cfg, until=STAGE)
    print(format_tune_summary(result.outputs[STAGE]))
    return 0
