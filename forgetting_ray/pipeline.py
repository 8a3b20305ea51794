"""The whole pipeline, stage after stage; every stage is skipped when its content-addressed output exists.

prepare -> reference -> score -> partition -> [tune] -> train (+ baselines) -> eval

With ``tune.enabled`` a Ray Tune search over rho and the lambda schedule runs after partition; the
best trial's model is then the forgetting model (not retrained), and the baselines train on the
same rows at the best rho.  The parent MLflow run carries the config, the run card and the plots.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cluster.run_dir import check_run_dir
from .config import PipelineConfig, config_to_dict, dump_config, flatten
from .data.readers import read_records, resolve_inputs
from .data.sources import FileSource
from .exports import model_identity
from .report.html import REPORT_ARTIFACT_DIR, main_report, write_results_page
from .report.plots import log_finetune_plots
from .report.study import StudyError, compare_models, read_eval_samples, results_table
from .run_lock import hold_run_dir
from .runcard import RunCard
from .search import resolve_objective
from .stages.evaluate import (EVAL_RESULTS_FILE, check_eval_files, eval_key, load_eval_result, log_model_scores,
                               run_eval)
from .stages.partition import run_partition
from .stages.prepare import run_prepare
from .stages.score import run_score
from .stages.train import model_params, run_finetune
from .stages.tune import run_tune
from .store import is_complete, portable, run_root, tree_sha256
from .tiny import build_demo_model, corpus_lines
from .tracking import OUTBOX_FILE, Outbox, Tracker, compare_runs_url, experiment_url, models_url, resolve_tracking_uri

log = logging.getLogger(__name__)

STAGES = ("prepare", "reference", "score", "partition", "tune", "train", "eval")


@dataclass
class PipelineResult:
    outputs: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    tracker: Tracker | None = None
    run_card: Path | None = None
    model_ids: dict[str, str] = field(default_factory=dict)  # export folder -> its MLflow LoggedModel
    results: str | None = None  # the result table (means and paired differences with their intervals)


def start_tracking(cfg: PipelineConfig, run_name: str = "pipeline") -> Tracker:
    if not cfg.tracking.enabled:
        return Tracker.disabled()
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.run_dir)
    tracker = Tracker.start(uri, cfg.tracking.experiment_name, run_name, tags={"forgetting_ray.run_dir": portable(run_root(cfg.run_dir))},
                            journal=run_root(cfg.run_dir) / OUTBOX_FILE)
    tracker.log_params(flatten(config_to_dict(cfg)))
    tracker.log_text(dump_config(cfg), "config.yaml")
    return tracker


def use_tiny_model(cfg: PipelineConfig) -> PipelineConfig:
    """The ``--tiny`` variant: a random 2-layer Llama whose tokenizer is trained on the corpus."""
    check_run_dir(cfg.run_dir, cfg.resources.ray_address)  # the model is written there
    texts: list[str] = []
    for source in resolve_inputs(cfg.data.train_files + cfg.data.reference_files):
        if isinstance(source, FileSource):
            texts += corpus_lines([source.path])
        else:  # a dataset: the text of its records
            texts += [m.content for r in read_records([source], cfg.data, limit=5000) for m in r.messages]
    model_dir = build_demo_model(run_root(cfg.run_dir) / "tiny_model", texts)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": str(model_dir.resolve())})})


def _timed(result: PipelineResult, name: str, tracker: Tracker, fn, *args, detail: str | None = None, **kwargs):
    """Run one stage as an MLflow child run and record its wall time; a console line as it starts (with
    ``detail``: which model) and as it ends (wall time, output, whether a finished result was reused)."""
    start = time.perf_counter()
    log.info("== %s%s", name, f" ({detail})" if detail else "")
    with tracker.stage(name) as t:
        out = fn(t, *args, **kwargs)
        result.seconds[name] = time.perf_counter() - start
        t.log_metrics({"stage_seconds": result.seconds[name]})
    where = getattr(out, "export_dir", None) or getattr(out, "dir", None) or getattr(out, "folder", None)
    reused = " (reused)" if getattr(out, "cached", False) else ""
    log.info("== %s done in %.1f s%s%s", name, result.seconds[name], reused, f": {where}" if where else "")
    result.outputs[name] = out
    return out


def _prepare(t: Tracker, cfg: PipelineConfig):
    prep = run_prepare(cfg)
    t.log_params({"key": prep.key, "cached": prep.cached})
    t.log_metrics(flatten(prep.read_manifest().get("counts", {})))
    t.log_artifact(prep.manifest_path)
    log_splits(t, prep)
    return prep


def log_splits(t: Tracker, prep) -> None:
    """The training and reference splits as MLflow datasets (name, content hash, location, rows)."""
    sets = prep.read_manifest().get("sets", {})
    for split, path in (("train", prep.train_path), ("reference", prep.reference_path)):
        info = sets.get(split, {})
        t.log_dataset(f"{split}-split", info.get("content_hash", prep.key), portable(Path(path).resolve()),
                      context="training" if split == "train" else "reference", num_rows=info.get("n_samples"))


def _finetune(t: Tracker, cfg: PipelineConfig, stage: str, table: Path, card=None, name: str | None = None,
              model_ids: dict[str, str] | None = None, reference: Path | None = None):
    logged: set[int] = set()

    def log_step(row: dict) -> None:  # live, from this process, while the fit runs
        step = int(row.get("step", 0))
        if step not in logged:  # a worker restarted from a checkpoint repeats the steps after it
            t.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
            logged.add(step)

    res = run_finetune(cfg, stage, table, on_step=log_step if t.enabled else None)
    _log_finetune(t, cfg, res, card, name or stage, logged, model_ids, reference)
    return res


def _log_finetune(t: Tracker, cfg: PipelineConfig, res, card, name: str, logged: set[int] = frozenset(),
                  model_ids: dict[str, str] | None = None, reference: Path | None = None) -> None:
    """Step metrics (those not logged live), plots and the export of a finished fine-tune: an MLflow LoggedModel
    (by URI and hash, ``model_ids`` maps its folder to the model's id), registered as ``tracking.register_as``
    when it is the pipeline's answer (the configured strategy's fine-tune or Tune's best)."""
    for row in res.metrics:
        if int(row.get("step", 0)) not in logged:
            t.log_metrics({k: v for k, v in row.items() if k != "step"}, step=int(row.get("step", 0)))
    t.log_params({"key": res.key, "total_steps": res.total_steps})
    if res.stop_reason:
        t.set_tags({"guardrail.stop_reason": res.stop_reason})
    if res.metrics and t.enabled:
        log_finetune_plots(t, res, cfg.training if res.stage == "train" else None)
    if res.export_dir is not None:
        sha = tree_sha256(res.export_dir)
        shown_as = "reference" if res.stage == "reference" else cfg.training.strategy  # the Models tab's names
        model_id = t.log_model(shown_as, res.export_dir, sha, model_params(cfg, res.stage, reference),
                               upload=cfg.tracking.upload_models)
        if model_id and model_ids is not None:
            model_ids[str(res.export_dir)] = model_id
        if model_id and name == "train" and cfg.tracking.register_as:
            version = t.register_model(model_id, cfg.tracking.register_as)
            if version:  # None: MLflow was down and the outbox holds the registration
                log.info("registered %s as %s version %d", res.export_dir, cfg.tracking.register_as, version)
        if card is not None:
            card.add_model(name, res.export_dir, sha, key=res.key, steps=res.global_step, nodes=res.nodes)


def _score(t: Tracker, cfg: PipelineConfig, table: Path, reference: Path):
    res = run_score(cfg, table, reference)
    t.log_params({"key": res.key, "cached": res.cached, "dir": str(res.dir)})
    t.log_metrics({"n_samples": res.n_samples, "n_shards": res.n_shards, "n_response_tokens": res.n_response_tokens,
                   "shards_scored": len(res.shards_scored), "shards_reused": len(res.shards_reused)})
    return res


def _partition(t: Tracker, cfg: PipelineConfig, table: Path, score_dir: Path):
    res = run_partition(cfg, table, score_dir)
    t.log_params({"key": res.key, "rho": cfg.selection.rho, "threshold": res.threshold})
    t.log_metrics({"n_tokens": res.n_tokens, "n_positive": res.n_positive, "n_negative": res.n_negative})
    t.log_metrics(reference_evidence(json.loads(res.info_path.read_text())))
    t.log_artifact(res.info_path)
    t.log_artifact(res.histogram_path, "plots")
    if t.enabled:  # the audit page: what will be trained and what forgotten, for 20 random samples
        main_report(cfg, res.dir, tracker=t)
    return res


def reference_evidence(info: dict) -> dict[str, float]:
    """What says whether the reference learned (partition.json): its held-out NLL gain on the training split and
    the median base NLL of the positives and of the negatives, as metrics."""
    nll = info.get("nll") or {}
    q = nll.get("base_nll_quantiles") or {}
    out = {"reference_heldout_gain": nll.get("heldout_gain"), "reference_heldout_gain_relative": nll.get("heldout_gain_relative"),
           "reference_barely_differs": float(bool(info.get("reference_barely_differs"))),
           "positives_base_nll_p50": (q.get("positive") or {}).get("p50"),
           "negatives_base_nll_p50": (q.get("negative") or {}).get("p50")}
    return {k: v for k, v in out.items() if v is not None}


def _tune(t: Tracker, cfg: PipelineConfig, table: Path, scores):
    return run_tune(cfg, table, scores, t)


def _evaluate(t: Tracker, cfg: PipelineConfig, models: dict[str, str], model_ids: dict[str, str] | None = None):
    """Each model on the benchmarks; a fine-tune's scores are linked to its LoggedModel (the Models tab)."""
    results = {}
    for name, path in models.items():
        key = eval_key(cfg, model_identity(path))
        out = run_root(cfg.run_dir) / "eval" / f"{name}-{key}"
        if is_complete(out, EVAL_RESULTS_FILE):  # results.json is written last
            log.info("eval: reusing %s for %s", out, name)
            results[name] = load_eval_result(out)
            run = t
        else:
            with t.stage(f"eval-{name}") as run:
                run.log_params({"model": path, "key": key})
                results[name] = run_eval(cfg, path, out, tracker=run)
        model_id = (model_ids or {}).get(path)
        if model_id:
            log_model_scores(run, cfg, model_id, results[name])
    return results


def run_pipeline(cfg: PipelineConfig, *, until: str | None = None) -> PipelineResult:
    """Run the stages in order up to ``until`` (default: all), logging each as an MLflow child run."""
    if until is not None and until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; choose one of {', '.join(STAGES)}")
    if until == "tune" and not cfg.tune.enabled:
        raise ValueError("stage 'tune' needs tune.enabled: true")
    last = STAGES.index(until) if until else len(STAGES) - 1
    if cfg.tune.enabled and last >= STAGES.index("tune"):
        resolve_objective(cfg)  # a search that cannot run fails before any compute
    if cfg.eval.enabled and last >= STAGES.index("eval"):
        check_eval_files(cfg)  # a missing benchmark file fails now, not after hours of training

    check_run_dir(cfg.run_dir, cfg.resources.ray_address)  # an unusable run_dir fails before any compute
    with hold_run_dir(cfg.run_dir, stale_after_s=cfg.run_dir_lock_stale_s):  # one run per run_dir at a time
        return _run_held(cfg, until, last)


def _run_held(cfg: PipelineConfig, until: str | None, last: int) -> PipelineResult:
    result = PipelineResult(tracker=start_tracking(cfg))
    tracker = result.tracker
    card = RunCard(cfg, until=until)
    status = "FAILED"
    monitor = (tracker.system_metrics(cfg.tracking.system_metrics_interval_s) if cfg.tracking.system_metrics
               else contextlib.nullcontext())
    try:
        with monitor:
            _run_stages(cfg, result, card, last)
        status = "FINISHED"
        return result
    finally:
        card.add_stage("seconds", {k: round(v, 2) for k, v in result.seconds.items()})
        card.card["status"] = status
        result.run_card = card.write()
        if tracker.enabled:
            try:
                tracker.log_artifact(result.run_card)
            finally:
                tracker.end(status)
                _send_kept(tracker)


def _send_kept(tracker: Tracker) -> None:
    """The run's last try at sending what an MLflow outage held back; what stays is named for `sync`."""
    try:
        tracker.send_kept()
    except Exception as e:  # a write the server refuses for another reason: the journal keeps it for sync
        log.warning("MLflow: could not send the kept writes (%s)", str(e).splitlines()[0][:200])
    box = Outbox.of(tracker.journal)
    if box is not None and box.pending():
        log.warning("MLflow still does not answer: %d writes stay in %s; send them with: forgetting-ray sync %s",
                    box.pending(), box.path, box.path.parent)


def _run_stages(cfg: PipelineConfig, result: PipelineResult, card: RunCard, last: int) -> None:
    """The stages up to index ``last`` of STAGES, each an MLflow child run of ``result.tracker``."""
    tracker = result.tracker
    prep = _timed(result, "prepare", tracker, _prepare, cfg)
    log_splits(tracker, prep)  # the parent run's row in the runs table shows the data it trained on
    card.add_data(prep)
    if last >= STAGES.index("reference"):
        ref = _timed(result, "reference", tracker, _finetune, cfg, "reference", prep.reference_path, card,
                     model_ids=result.model_ids, detail=f"fine-tune {cfg.model.name_or_path}")
    if last >= STAGES.index("score"):
        scores = _timed(result, "score", tracker, _score, cfg, prep.train_path, ref.export_dir,
                        detail=f"{cfg.model.name_or_path} against its reference")
        card.add_scores(scores)
    if last >= STAGES.index("partition"):
        part = _timed(result, "partition", tracker, _partition, cfg, prep.train_path, scores.dir)
        card.add_stage("partition", {"key": part.key, "rho": cfg.selection.rho, "threshold": part.threshold})
        tracker.log_artifact(part.histogram_path, "plots")
    train_cfg, train_table, tuned = cfg, None, None
    if cfg.tune.enabled and last >= STAGES.index("tune"):
        tuned = _timed(result, "tune", tracker, _tune, cfg, prep.train_path, scores)
        card.add_stage("tune", {"key": tuned.key, "space_hash": tuned.space_hash, "objective": tuned.objective,
                                "best": tuned.best, "dir": str(tuned.dir)})
        card.add_model("tune-best", tuned.best_export_dir, trial=tuned.best["trial_id"])
        train_cfg, train_table = tuned.best_config, tuned.best_table
        _log_plots(tracker, Path(tuned.best_train.out_dir) / "plots")
    if last >= STAGES.index("train"):
        train_table = train_table or part.train_path
        models = {}  # table order: baselines first, the configured strategy last
        for strategy in cfg.baselines:
            if strategy == train_cfg.training.strategy:
                continue
            variant = train_cfg.model_copy(update={"training": train_cfg.training.model_copy(update={"strategy": strategy})})
            models[strategy] = _timed(result, f"train-{strategy}", tracker, _finetune, variant, "train",
                                      train_table, card, f"train-{strategy}", result.model_ids, ref.export_dir)
        if tuned is not None:  # the best trial is the forgetting model: log it, do not retrain it
            models[train_cfg.training.strategy] = _timed(result, "train", tracker, _adopt_best, train_cfg, tuned, card,
                                                         result.model_ids, ref.export_dir)
        else:
            models[cfg.training.strategy] = _timed(result, "train", tracker, _finetune, cfg, "train",
                                                   train_table, card, "train", result.model_ids, ref.export_dir,
                                                   detail=f"{cfg.training.strategy} on {cfg.model.name_or_path}")
            _log_plots(tracker, Path(models[cfg.training.strategy].out_dir) / "plots")
    if last >= STAGES.index("eval") and cfg.eval.enabled:
        paths = {"base": cfg.model.name_or_path} if cfg.eval_base_model else {}
        paths.update({name: str(r.export_dir) for name, r in models.items()})
        evals = _timed(result, "eval", tracker, _evaluate, train_cfg, paths, result.model_ids)
        card.add_stage("eval", {name: {"headline": r.headline, "average": r.average} for name, r in evals.items()})
        tracker.log_metrics(result_metrics(evals, cfg.training.strategy))
        result.results = comparison_table(evals)
        page = write_results_page(result.results, run_root(cfg.run_dir) / "report" / "results.html",
                                  meta=f"{cfg.model.name_or_path} · run_dir {cfg.run_dir}")  # (uploaded as written)
        tracker.log_artifact(page, REPORT_ARTIFACT_DIR)


def result_metrics(evals: dict[str, Any], strategy: str) -> dict[str, float]:
    """The answer, for the pipeline's parent run (so the Runs table compares pipelines without opening them):
    each model's headline per task and mean, and the configured strategy's paired differences from SFT and
    `ignore` on the mean with their 95 % interval and p (report.study.compare_models)."""
    metrics = {f"{name}.{task}": v for name, r in evals.items() for task, v in r.headline.items()}
    metrics |= {f"{name}.mean": r.average for name, r in evals.items() if r.average is not None}
    tasks = sorted({t for r in evals.values() for t in r.headline})
    against = [b for b in ("sft", "ignore") if b in evals and b != strategy]
    if strategy not in evals or not against:
        return metrics
    try:
        samples = {name: read_eval_samples(evals[name].out_dir, tasks) for name in (strategy, *against)}
    except (OSError, StudyError) as e:
        log.warning("no paired differences on the parent run: %s", e)
        return metrics
    for b in against:
        m = compare_models(samples, strategy, b, n_boot=2000).mean
        metrics |= {f"{strategy}-{b}.mean": m.estimate, f"{strategy}-{b}.ci_low": m.low,
                    f"{strategy}-{b}.ci_high": m.high, f"{strategy}-{b}.p": m.p_two_sided}
    return metrics


def _log_plots(tracker: Tracker, folder: Path) -> None:
    for name in ("lambda_schedule.png", "loss_curves.png"):
        if (folder / name).is_file():
            tracker.log_artifact(folder / name, "plots")


def _adopt_best(t: Tracker, cfg: PipelineConfig, tuned, card, model_ids: dict[str, str] | None = None,
                reference: Path | None = None):
    """The train stage after a search: the best trial's fine-tune, logged like a trained model."""
    t.set_tags({"forgetting_ray.from_trial": tuned.best["trial_id"]})
    t.log_params({f"best.{k}": v for k, v in sorted(tuned.best["config"].items())})
    _log_finetune(t, cfg, tuned.best_train, card, "train", model_ids=model_ids, reference=reference)
    return tuned.best_train


def comparison_table(evals: dict[str, Any]) -> str:
    """Rows = models (base, sft, forgetting, ...), columns = headline metric per benchmark + the mean with its
    95 % interval; then the paired differences from SFT and `ignore` and whether each is distinguishable from
    zero (report.study.results_table). Without per-document samples: the scores alone."""
    tasks = sorted({t for r in evals.values() for t in r.headline})
    try:
        samples = {name: read_eval_samples(r.out_dir, tasks) for name, r in evals.items()}
        return results_table(samples)
    except (OSError, StudyError) as e:
        log.warning("no intervals in the result table: %s", e)
    header = "| model | " + " | ".join(tasks) + " | mean |"
    lines = [header, "|" + "---|" * (len(tasks) + 2)]
    for name, r in evals.items():
        cells = [f"{100 * r.headline[t]:.2f}" if t in r.headline else "-" for t in tasks]
        mean = f"{100 * r.average:.2f}" if r.average is not None else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def summarize(cfg: PipelineConfig, result: PipelineResult) -> str:
    out = ["", "stage timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())]
    for name, value in result.outputs.items():
        path = getattr(value, "export_dir", None) or getattr(value, "dir", None)
        if path is not None:
            out.append(f"{name}: {path}")
    if "eval" in result.outputs:
        out += ["", result.results or comparison_table(result.outputs["eval"])]
    if result.tracker is not None and result.tracker.enabled:
        t = result.tracker
        ui = t.uri if t.uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        out += ["", "MLflow UI:"]
        if ui != t.uri:
            out.append(f"  mlflow ui --backend-store-uri {t.uri} --host 127.0.0.1 --port 5000")
        out.append(f"  {experiment_url(ui, t.experiment_id)}")
        if result.model_ids:
            out.append(f"  the fine-tunes and their scores: {models_url(ui, t.experiment_id)}")
        trial_runs = getattr(result.outputs.get("tune"), "trial_runs", None)
        if trial_runs:
            out.append(f"  the Tune trials side by side: {compare_runs_url(ui, t.experiment_id, list(trial_runs.values()))}")
    return "\n".join(out)
