"""Eval stage: score a model on the five benchmarks and write ``results.json``.

Recipe, top to bottom (``run_eval``):

1. ``_check_request``: the harness and every task name exist, before any model is loaded;
2. resolve the model folder (an export's ``merged/``) and the model settings to load it with;
3. ``_evaluate_native`` (or lm-evaluation-harness on the same local files): load each task's
   documents (subset rule applied) -> turn them into JSON request rows, sorted by length -> answer
   them in a Ray Data actor pool (``_answer_on_ray``, each actor loads the model once) or in this
   process -> score per example;
4. ``_write_samples``: the per-example records, one JSONL file per task;
5. ``results.json`` last (its presence means the evaluation finished), then ``_log_mlflow``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..cluster.capacity import bounded_actor_start, check_actor_pool_cpus, gpu_node_resources
from ..cluster.session import init_ray, ray_data_bars_off
from ..config import EvalConfig, ModelConfig, PipelineConfig, ResourcesConfig, config_to_dict
from ..errors import UserError
from ..eval import runner
from ..eval.base import check_input, input_fingerprint
from ..eval.harness import run_lm_eval
from ..eval.lm import ChatTemplateError, Engine
from ..exports import MERGED, resolve
from ..models import load_model, load_tokenizer, portable_model, stage_device
from ..store import atomic_write_json, atomic_write_text, content_hash
from ..tracking import Tracker, resolve_tracking_uri

log = logging.getLogger(__name__)

EVAL_RESULTS_FILE = "results.json"
# The user's model settings that eval keeps when it loads the model under test (see _model_config)
LOAD_SETTINGS = ("dtype", "attn_implementation", "trust_remote_code")


class EvalConfigError(UserError, ValueError):
    """Evaluation settings that cannot run on this cluster."""


@dataclass
class EvalResult:
    out_dir: Path
    results_path: Path
    metrics: dict[str, dict[str, float]]  # task -> metric -> value
    headline: dict[str, float]  # task -> its headline metric
    average: float | None  # mean of the five headline metrics (None when a task was not run)
    harness: str = "native"
    samples: dict[str, Path] = field(default_factory=dict)

    @property
    def results(self) -> dict[str, Any]:
        return json.loads(self.results_path.read_text())


def resolve_eval_model(model_path: str | Path) -> str:
    """What eval loads (a folder or a URI): an export's full model (``merged/``), else ``model_path`` as it is
    (a Hugging Face folder, a hub id)."""
    source = resolve(model_path, prefer=MERGED)
    return source.path if source is not None else str(model_path)


def _model_config(cfg: PipelineConfig, model_path: str) -> ModelConfig:
    # Keep the user's loading settings (dtype, remote code, attention) but point at the model to test;
    # the tokenizer is the one saved with it.
    return cfg.model.model_copy(update={"name_or_path": model_path, "tokenizer": None, "revision": None})


def build_engine(mcfg: ModelConfig, ecfg: EvalConfig, device: str | None = None, *,
                 cpu_stands_in: bool = False) -> Engine:
    if device is None:
        device = stage_device(ecfg.num_gpus_per_actor > 0, "eval.num_gpus_per_actor", cpu_stands_in=cpu_stands_in)
    tok = load_tokenizer(mcfg)
    model = load_model(mcfg, device=device)
    return Engine(model, tok, batch_size=ecfg.batch_size, prefix_reuse=ecfg.prefix_reuse,
                  chat_template=ecfg.chat_template)


class EvalPredictor:
    """Ray Data actor: loads the model once, answers batches of JSON request rows."""

    def __init__(self, model_cfg: ModelConfig, eval_cfg: EvalConfig, threads: int,
                 cpu_stands_in: bool = False) -> None:
        torch.set_num_threads(max(1, threads))
        self.engine = build_engine(model_cfg, eval_cfg, cpu_stands_in=cpu_stands_in)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        requests = [json.loads(r) for r in batch["request"]]
        answers = runner.answer_requests(self.engine, requests)
        return {"idx": batch["idx"], "answer": [json.dumps(a) for a in answers]}


def _check_cpu_budget(cfg: PipelineConfig, ray) -> None:
    check_actor_pool_cpus(ray, "eval", cfg.eval, res=cfg.resources, error=EvalConfigError)


def _answer_on_ray(cfg: PipelineConfig, model_cfg: ModelConfig, requests: list[dict[str, Any]], label: str) -> list[Any]:
    # ray and mlflow are imported where they are used: each takes seconds, and the pipeline imports this
    # module whatever the backend and tracking settings.
    import ray

    init_ray(cfg.resources.ray_address)
    e = cfg.eval
    _check_cpu_budget(cfg, ray)
    # both before the Dataset copies the context
    with bounded_actor_start("eval", e, cfg.resources.placement_timeout_s), ray_data_bars_off():
        answers = _predict(e, model_cfg, requests, label, cfg.resources)
    missing = [i for i, a in enumerate(answers) if a is None]
    if missing:
        raise RuntimeError(f"Ray eval returned no answer for {len(missing)} request(s), e.g. #{missing[0]}")
    return answers


def _predict(e: Any, model_cfg: ModelConfig, requests: list[dict[str, Any]], label: str,
             res: ResourcesConfig) -> list[Any]:
    """The answers, in request order, from a pool of :class:`EvalPredictor` actors; a bar of requests answered."""
    import ray

    ds = ray.data.from_items([{"idx": i, "request": json.dumps(r)} for i, r in enumerate(requests)])
    # Small inputs arrive as one block and would feed a single actor (STACK_NOTES Exp 3): split them.
    per_call = e.batch_size * 4
    ds = ds.repartition(max(e.concurrency, math.ceil(len(requests) / per_call)))
    out = ds.map_batches(
        EvalPredictor,
        fn_constructor_kwargs={
            "model_cfg": portable_model(model_cfg),  # the actors may run on other nodes
            "eval_cfg": e,
            "threads": max(1, int(e.num_cpus_per_actor)),
            "cpu_stands_in": res.cpu_stands_in_for_gpu,
        },
        batch_size=per_call,
        batch_format="numpy",
        # one batch in flight per actor: otherwise the first actor up queues most of the work
        compute=ray.data.ActorPoolStrategy(size=e.concurrency, max_tasks_in_flight_per_actor=1),
        num_cpus=e.num_cpus_per_actor,
        num_gpus=e.num_gpus_per_actor or None,
        resources=gpu_node_resources(res, e.num_gpus_per_actor) or None,
    )
    answers: list[Any] = [None] * len(requests)
    with tqdm(total=len(requests), desc=f"eval {label}", unit="request", mininterval=1.0, dynamic_ncols=True) as bar:
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):  # as each actor call completes
            for i, a in zip(batch["idx"], batch["answer"]):
                answers[int(i)] = json.loads(a)
            bar.update(len(batch["idx"]))
    return answers


def _benchmark_digests(cfg: PipelineConfig) -> dict[str, str]:
    """Each benchmark subset's identity: its files' content and the subset taken (limit)."""
    return {name: content_hash({"data": fp, "limit": cfg.eval.limit}) for name, fp in eval_data_fingerprint(cfg.eval).items()}


def _log_benchmarks(cfg: PipelineConfig, result: dict[str, Any], tracker: Any) -> None:
    """Each benchmark subset as an MLflow dataset."""
    digests = _benchmark_digests(cfg)
    for name, metrics in result["tasks"].items():
        sources = [str(getattr(inp, "path", inp)) for inp in runner.get_task(name).files(cfg.eval)]
        tracker.log_dataset(name, digests.get(name, ""), sources[0] if len(sources) == 1 else json.dumps(sources),
                            context="eval", num_rows=int(metrics.get("n", 0)))


def log_model_scores(tracker: Any, cfg: PipelineConfig, model_id: str, result: EvalResult) -> None:
    """A fine-tune's scores on its MLflow LoggedModel (the Models tab's columns): each benchmark's headline
    metric, linked to that benchmark's dataset, and their mean."""
    digests = _benchmark_digests(cfg)
    for name, value in result.headline.items():
        tracker.log_metrics({name: value}, model_id=model_id, dataset=(name, digests.get(name, "")))
    if result.average is not None:
        tracker.log_metrics({"mean": result.average}, model_id=model_id)


def _log_mlflow(cfg: PipelineConfig, result: dict[str, Any], tracker: Any = None) -> None:
    if not cfg.tracking.enabled:
        return
    flat = {f"eval.{t}.{k}": v for t, ms in result["tasks"].items() for k, v in ms.items()}
    if result["average"] is not None:
        flat["eval.average"] = result["average"]
    if tracker is not None:
        tracker.log_metrics(flat)
        _log_benchmarks(cfg, result, tracker)
        return
    import mlflow

    if mlflow.active_run() is not None:  # inside a pipeline/Tune run: log there
        mlflow.log_metrics({k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        return
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.run_dir)
    run = Tracker.start(uri, cfg.tracking.experiment_name, "eval", {"forgetting_ray.stage": "eval"})
    try:
        run.log_params({"eval.model": result["model"], "eval.harness": result["harness"],
                        "eval.limit": cfg.eval.limit, "eval.tasks": ",".join(result["tasks"])})
        run.log_metrics(flat)
        _log_benchmarks(cfg, result, run)
    finally:
        run.end()


def check_eval_files(cfg: PipelineConfig) -> None:
    """Every configured benchmark file exists and every dataset opens: the pipeline calls this before any compute."""
    for name in cfg.eval.tasks:
        for inp in runner.get_task(name).files(cfg.eval):
            check_input(inp, name)


def eval_data_fingerprint(ecfg: EvalConfig) -> dict[str, list[str]]:
    """task -> the content of what it reads: each file's sha256, each dataset's rows' sha256."""
    return {name: [input_fingerprint(inp) for inp in runner.get_task(name).files(ecfg)] for name in ecfg.tasks}


def eval_key(cfg: PipelineConfig, model: dict[str, Any]) -> str:
    """Key of an evaluation's folder: the model's identity (:func:`forgetting_ray.exports.model_identity`), the
    settings it is loaded with, the eval settings and the benchmark data's content."""
    load = {k: v for k, v in config_to_dict(cfg.model).items() if k in LOAD_SETTINGS}
    return content_hash({"model": model, "load": load, "eval": config_to_dict(cfg.eval),
                         "data": eval_data_fingerprint(cfg.eval)})


def _check_request(cfg: PipelineConfig, harness: str | None) -> str:
    """The harness to use; unknown harness or task names fail before any model is loaded."""
    harness = harness or cfg.eval.harness
    if harness not in ("native", "lm-eval"):
        raise ValueError(f"unknown harness {harness!r}; use 'native' or 'lm-eval'")
    for name in cfg.eval.tasks:
        runner.get_task(name)
    return harness


def _evaluate_native(cfg: PipelineConfig, model_cfg: ModelConfig, model_path: str, label: str):
    """This package's evaluation: documents -> requests -> answers (Ray or here) -> per-example scores.
    Returns (metrics, records) as ``runner.score_tasks``."""
    tok = load_tokenizer(model_cfg)
    if cfg.eval.chat_template and not getattr(tok, "chat_template", None):
        raise ChatTemplateError(f"eval.chat_template is on but the tokenizer of {model_path} has no chat template")
    docs = {name: runner.load_docs(name, cfg.eval, tok) for name in cfg.eval.tasks}
    rows = runner.prepare_requests(docs, cfg.eval)
    requests = [r["request"] for r in rows]
    log.info("eval: %d requests over %s", len(requests), {k: len(v) for k, v in docs.items()})
    if cfg.eval.backend == "ray":
        answers = _answer_on_ray(cfg, model_cfg, requests, label)
    else:
        engine = build_engine(model_cfg, cfg.eval,
                              cpu_stands_in=cfg.resources.cpu_stands_in_for_gpu)
        answers = runner.answer_requests(engine, requests)
    return runner.score_tasks(docs, rows, answers)


def _lm_eval(cfg: PipelineConfig, model_cfg: ModelConfig):
    """lm-evaluation-harness where the evaluation resources are: with ``eval.backend: ray`` in one Ray task
    holding eval.num_cpus_per_actor / num_gpus_per_actor (on a cluster the driver's head has no GPU),
    with ``local`` in this process."""
    if cfg.eval.backend == "local":
        return run_lm_eval(cfg, model_cfg)
    import ray  # lazy: importing this module must not start Ray

    init_ray(cfg.resources.ray_address)
    e = cfg.eval
    task = ray.remote(run_lm_eval).options(num_cpus=e.num_cpus_per_actor, num_gpus=e.num_gpus_per_actor,
                                           resources=gpu_node_resources(cfg.resources, e.num_gpus_per_actor),
                                           name="lm_eval")
    return ray.get(task.remote(cfg, portable_model(model_cfg)))


def _write_samples(out_dir: Path, records: dict[str, list[dict[str, Any]]]) -> dict[str, Path]:
    """One JSONL file of per-example records per task, under ``out_dir/samples``."""
    samples = {}
    for name, recs in records.items():
        samples[name] = atomic_write_text(
            out_dir / "samples" / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        )
    return samples


def run_eval(
    cfg: PipelineConfig,
    model_path: str,
    out_dir: Path,
    *,
    harness: str | None = None,
    tracker: Any = None,
) -> EvalResult:
    """Evaluate ``model_path`` on ``cfg.eval.tasks``; write ``out_dir/results.json`` and samples.

    ``harness``: "native" (this package) or "lm-eval" (lm-evaluation-harness on the same local
    files); None = ``cfg.eval.harness``.  ``tracker``: an optional forgetting_ray.tracking.Tracker
    to log into; otherwise the active MLflow run, else a new run at ``cfg.tracking.tracking_uri``.
    """
    harness = _check_request(cfg, harness)
    out_dir = Path(out_dir)
    model_path = resolve_eval_model(model_path)
    model_cfg = _model_config(cfg, model_path)
    t0 = time.time()

    if harness == "lm-eval":
        metrics, records = _lm_eval(cfg, model_cfg)
    else:
        metrics, records = _evaluate_native(cfg, model_cfg, model_path, out_dir.name)
    headline, average = runner.headline_scores(metrics)
    samples = _write_samples(out_dir, records)

    result = {
        "model": model_path,
        "harness": harness,
        "tasks": metrics,
        "headline": {name: {"metric": runner.HEADLINE[name], "value": v} for name, v in headline.items()},
        "average": average,
        "wall_s": round(time.time() - t0, 2),
        "eval_config": config_to_dict(cfg.eval),
    }
    path = atomic_write_json(out_dir / EVAL_RESULTS_FILE, result)  # written last: marks completion
    _log_mlflow(cfg, result, tracker)
    return EvalResult(out_dir=out_dir, results_path=path, metrics=metrics, headline=headline, average=average,
                      harness=harness, samples=samples)


def load_eval_result(out_dir: str | Path) -> EvalResult:
    """The :class:`EvalResult` of a finished evaluation folder (its ``results.json``)."""
    out_dir = Path(out_dir)
    path = out_dir / EVAL_RESULTS_FILE
    data = json.loads(path.read_text())
    return EvalResult(
        out_dir=out_dir,
        results_path=path,
        metrics=data["tasks"],
        headline={name: h["value"] for name, h in data["headline"].items()},
        average=data["average"],
        harness=data.get("harness", "native"),
        samples={p.stem: p for p in sorted((out_dir / "samples").glob("*.jsonl"))},
    )


def format_table(results: dict[str, Any] | EvalResult) -> str:
    """Printable table of ``results.json`` (or an :class:`EvalResult`)."""
    if isinstance(results, EvalResult):
        results = {"tasks": results.metrics, "average": results.average}
    return runner.format_table(results)
