"""The whole pipeline, stage after stage; every stage is skipped when its content-addressed output exists.

prepare -> reference -> score -> partition -> train (+ baselines) -> eval
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PipelineConfig, config_to_dict, dump_config, flatten
from .tracking import Tracker, resolve_tracking_uri

log = logging.getLogger(__name__)

STAGES = ("prepare", "reference", "score", "partition", "train", "eval")


@dataclass
class PipelineResult:
    outputs: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    tracker: Tracker | None = None


def start_tracking(cfg: PipelineConfig, run_name: str = "pipeline") -> Tracker:
    if not cfg.tracking.enabled:
        return Tracker.disabled()
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.run_dir)
    tracker = Tracker.start(uri, cfg.tracking.experiment_name, run_name, tags={"forgetting_ray.run_dir": str(Path(cfg.run_dir).resolve())})
    tracker.log_params(flatten(config_to_dict(cfg)))
    tracker.log_text(dump_config(cfg), "config.yaml")
    return tracker


def use_tiny_model(cfg: PipelineConfig) -> PipelineConfig:
    """The ``--tiny`` variant: a random 2-layer Llama whose tokenizer is trained on the corpus."""
    from .data.readers import resolve_files
    from .tiny import build_demo_model

    files = resolve_files(cfg.data.train_files + cfg.data.reference_files)
    model_dir = build_demo_model(Path(cfg.run_dir) / "tiny_model", files)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": str(model_dir.resolve())})})


def _timed(result: PipelineResult, name: str, tracker: Tracker, fn, *args, **kwargs):
    """Run one stage as an MLflow child run and record its wall time."""
    start = time.perf_counter()
    with tracker.stage(name) as t:
        out = fn(t, *args, **kwargs)
        result.seconds[name] = time.perf_counter() - start
        t.log_metrics({"stage_seconds": result.seconds[name]})
    result.outputs[name] = out
    return out


def _prepare(t: Tracker, cfg: PipelineConfig):
    from .data.prepare import run_prepare

    prep = run_prepare(cfg)
    t.log_params({"key": prep.key, "cached": prep.cached})
    t.log_metrics(flatten(prep.read_manifest().get("counts", {})))
    t.log_artifact(prep.manifest_path)
    return prep


def _finetune(t: Tracker, cfg: PipelineConfig, stage: str, table: Path):
    from .stages.train import run_finetune

    res = run_finetune(cfg, stage, table)
    for row in res.metrics:
        t.log_metrics({k: v for k, v in row.items() if k != "step"}, step=int(row.get("step", 0)))
    t.log_params({"key": res.key, "total_steps": res.total_steps})
    if res.stop_reason:
        t.set_tags({"guardrail.stop_reason": res.stop_reason})
    if res.export_dir is not None:
        from .store import tree_sha256

        t.log_model_reference(stage, res.export_dir, tree_sha256(res.export_dir), upload=cfg.tracking.upload_models)
    return res


def _score(t: Tracker, cfg: PipelineConfig, table: Path, reference: Path):
    from .stages.score import run_score

    return run_score(cfg, table, reference)


def _partition(t: Tracker, cfg: PipelineConfig, table: Path, score_dir: Path):
    from .stages.partition import run_partition

    return run_partition(cfg, table, score_dir)


def _evaluate(t: Tracker, cfg: PipelineConfig, models: dict[str, str]):
    from .stages.evaluate import run_eval

    results = {}
    for name, path in models.items():
        with t.stage(f"eval-{name}") as child:
            results[name] = run_eval(cfg, path, Path(cfg.run_dir) / "eval" / name, tracker=child)
    return results


def run_pipeline(cfg: PipelineConfig, *, until: str | None = None) -> PipelineResult:
    """Run the stages in order up to ``until`` (default: all), logging each as an MLflow child run."""
    if until is not None and until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; choose one of {', '.join(STAGES)}")
    last = STAGES.index(until) if until else len(STAGES) - 1
    result = PipelineResult(tracker=start_tracking(cfg))
    tracker = result.tracker
    try:
        prep = _timed(result, "prepare", tracker, _prepare, cfg)
        if last >= STAGES.index("reference"):
            ref = _timed(result, "reference", tracker, _finetune, cfg, "reference", prep.reference_path)
        if last >= STAGES.index("score"):
            scores = _timed(result, "score", tracker, _score, cfg, prep.train_path, ref.export_dir)
        if last >= STAGES.index("partition"):
            part = _timed(result, "partition", tracker, _partition, cfg, prep.train_path, scores.dir)
        if last >= STAGES.index("train"):
            trained = _timed(result, "train", tracker, _finetune, cfg, "train", part.train_path)
            models = {"forgetting": trained}
            for strategy in cfg.baselines:
                variant = cfg.model_copy(update={"training": cfg.training.model_copy(update={"strategy": strategy})})
                models[strategy] = _timed(result, f"train-{strategy}", tracker, _finetune, variant, "train", part.train_path)
        if last >= STAGES.index("eval") and cfg.eval.enabled:
            paths = {"base": cfg.model.name_or_path} if cfg.eval_base_model else {}
            paths.update({name: str(r.export_dir / "merged") for name, r in models.items()})
            _timed(result, "eval", tracker, _evaluate, cfg, paths)
        tracker.end()
        return result
    except BaseException:
        tracker.end("FAILED")
        raise


def comparison_table(evals: dict[str, Any]) -> str:
    """Rows = models (base, sft, forgetting, ...), columns = headline metric per benchmark + mean."""
    tasks = sorted({t for r in evals.values() for t in r.headline})
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
        out += ["", comparison_table(result.outputs["eval"])]
    if result.tracker is not None and result.tracker.enabled:
        out += ["", "MLflow UI:", f"  mlflow ui --backend-store-uri {result.tracker.uri} --host 127.0.0.1 --port 5000"]
    return "\n".join(out)
