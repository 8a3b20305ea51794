"""Run the FORGETTING vs SFT study with forgetting-ray's own pipeline and write docs/STUDY.md.

    .venv/bin/python examples/study/run_study.py                        # the full study (~2 h, 2 CPU cores)
    .venv/bin/python examples/study/run_study.py --tiny --out /tmp/STUDY.md run_dir=/tmp/study-tiny \
        reference.max_steps=2 training.max_steps=2 eval.limit=4         # a smoke run in a few minutes

Recipe: load examples/study/study.yaml (plus dotted overrides) -> ``run_pipeline`` (prepare ->
reference -> score -> partition -> sft, ignore and forgetting fine-tunes on the same data and steps
-> the five benchmarks for base, sft, ignore and forgetting; every finished stage and evaluation is
reused on a rerun, so an interrupted study continues where it stopped) -> read each evaluation's
per-example samples -> paired bootstrap of the differences -> the Markdown report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = Path(__file__).with_name("study.yaml")
COMPARISONS = [("forgetting", "sft"), ("forgetting", "ignore"), ("ignore", "sft"), ("forgetting", "base"),
               ("sft", "base")]


def _training_table(outputs: dict) -> str:
    """Last-step and mean NLLs per fine-tune: did the forgetting term push the negatives up?"""
    rows = ["| fine-tune | steps | first pos NLL | last pos NLL | last neg NLL | last λ |",
            "|---|---:|---:|---:|---:|---:|"]
    for stage, res in outputs.items():
        if not (stage == "reference" or stage.startswith("train")) or not getattr(res, "metrics", None):
            continue
        first, last = res.metrics[0], res.metrics[-1]
        name = {"train": "forgetting (train)"}.get(stage, stage)
        rows.append(f"| {name} | {res.global_step} | {first.get('pos_nll', float('nan')):.3f} | "
                    f"{last.get('pos_nll', float('nan')):.3f} | {last.get('neg_nll', float('nan')):.3f} | "
                    f"{last.get('lambda', 0.0):.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="FORGETTING vs SFT study -> docs/STUDY.md")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="study config (default: examples/study/study.yaml)")
    ap.add_argument("--out", default=str(REPO / "docs" / "STUDY.md"), help="where to write the report")
    ap.add_argument("--tiny", action="store_true", help="random tiny model (smoke test of the whole script)")
    ap.add_argument("--n-boot", type=int, default=10_000, help="bootstrap replicates")
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--json", default=None, help="also write the scores, intervals and hashes to this JSON file")
    ap.add_argument("--discussion", default=None,
                    help="a hand-written Markdown file appended as the report's Discussion (for a committed run)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. eval.limit=50")
    args = ap.parse_args(argv)
    for k, v in (("HF_HUB_OFFLINE", "1"), ("DS_ACCELERATOR", "cpu"), ("TOKENIZERS_PARALLELISM", "false"),
                 ("MLFLOW_DISABLE_TELEMETRY", "true"), ("RAY_AUTH_MODE", "disabled"),
                 ("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))):
        os.environ.setdefault(k, v)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from forgetting_ray.config import config_to_dict, load_config
    from forgetting_ray.pipeline import run_pipeline, use_tiny_model
    from forgetting_ray.report.study import StudyReport, compare_models, read_eval_samples
    from forgetting_ray.store import atomic_write_text, content_hash, file_sha256

    cfg = load_config(args.config, args.overrides)
    if args.tiny:
        cfg = use_tiny_model(cfg)
    result = run_pipeline(cfg)
    out = result.outputs
    evals = out["eval"]  # model name -> EvalResult (base first, the configured strategy last)

    samples = {name: read_eval_samples(r.out_dir, cfg.eval.tasks) for name, r in evals.items()}
    # The samples must reproduce the stage's own headline numbers, or we are reading the wrong field.
    for name, r in evals.items():
        for task, value in r.headline.items():
            mine = samples[name][task].score()
            if abs(mine - value) > 1e-9:
                raise RuntimeError(f"{r.out_dir}: {task} headline {value} but the samples give {mine}")
    comparisons = [compare_models(samples, a, b, n_boot=args.n_boot, confidence=args.confidence, seed=cfg.seed)
                   for a, b in COMPARISONS if a in samples and b in samples]

    prep, part = out["prepare"], out["partition"]
    manifest = prep.read_manifest()
    counts = {s: manifest["sets"][s] for s in ("train", "reference")}
    tr, ft = cfg.training, out["train"]
    n_tokens = part.n_positive + part.n_negative
    model_name = cfg.model.name_or_path if not args.tiny else "tiny random Llama (--tiny smoke run)"
    task_n = {t: len(next(iter(samples.values()))[t].values) for t in cfg.eval.tasks}
    ref_cfg = cfg.reference
    ref_line = (f"reference SFT: {out['reference'].global_step} steps x {ref_cfg.micro_batch_size * ref_cfg.grad_accum} "
                f"sequences x {cfg.resources.num_workers} worker(s), lr {ref_cfg.lr}, "
                + (f"LoRA r={ref_cfg.lora.r}" if ref_cfg.lora.enabled else "full weights"))
    setup = [
        f"base model: `{model_name}`; data: `{', '.join(cfg.data.train_files)}`, max_length {cfg.data.max_length}",
        (f"prepare: {counts['train']['n_samples']} training samples ({counts['train']['n_response_tokens']} response "
         f"tokens), {counts['reference']['n_samples']} disjoint reference samples"),
        ref_line,
        (f"partition: rho = {cfg.selection.rho}: {part.n_positive} positive / {part.n_negative} negative tokens of "
         f"{n_tokens}, threshold {part.threshold}"),
        (f"fine-tunes (sft, ignore, forgetting): the same {ft.global_step} steps x "
         f"{tr.micro_batch_size * tr.grad_accum} sequences x {cfg.resources.num_workers} worker(s), same order, "
         f"lr {tr.lr}, LoRA r={tr.lora.r}; forgetting: λ {tr.lambda_schedule} to t_max = {tr.t_max}, "
         f"{tr.normalization} normalisation"),
        (f"evaluation: harness `{cfg.eval.harness}`, seeded subsets (limit {cfg.eval.limit}, mode "
         f"`{cfg.eval.limit_mode}`, seed {cfg.eval.seed}): " + ", ".join(f"{t} {n}" for t, n in task_n.items())),
        ("stage wall times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in result.seconds.items())
         + " (a resumed run only counts what it redid)"),
    ]
    hashes = {
        "config (content hash)": content_hash(config_to_dict(cfg)),
        "prepare key": prep.key,
        "prepare train table": manifest["sets"]["train"]["content_hash"],
        "prepare reference table": manifest["sets"]["reference"]["content_hash"],
        "score key": out["score"].key,
        "partition key": part.key,
    }
    for stage, res in out.items():
        if stage.startswith("train") or stage == "reference":
            label = {"train": f"train ({tr.strategy})"}.get(stage, stage)
            hashes[f"{label} key"] = res.key
            if res.export_dir is not None and (Path(res.export_dir) / "manifest.json").is_file():
                hashes[f"{label} export manifest sha256"] = file_sha256(Path(res.export_dir) / "manifest.json")
    for name, r in evals.items():
        hashes[f"eval {name} results.json sha256"] = file_sha256(r.results_path)

    notes = [
        (f"Scale: `{model_name}`, {counts['train']['n_samples']} training samples and {ft.global_step} "
         f"{'LoRA' if tr.lora.enabled else 'full-weight'} steps on CPU; the paper's setting is 1B-8B models on "
         "50k samples. A difference that is within noise here says the study cannot tell the methods apart at "
         "this size, not that they are equal."),
        ("The intervals are over the evaluation examples only (which benchmark questions were drawn); they do not "
         "cover training randomness (seed, data order), which a single run cannot measure."),
    ]
    report = StudyReport("FORGETTING vs standard SFT on SmolLM2-135M" if not args.tiny else
                         "Study smoke run (--tiny: random model, numbers are meaningless)",
                         setup, samples, comparisons, hashes, training=_training_table(out), notes=notes)
    text = report.markdown()
    if args.discussion:
        text = text.rstrip("\n") + "\n\n## Discussion\n\n" + Path(args.discussion).read_text(encoding="utf-8").strip() + "\n"
    path = atomic_write_text(args.out, text)
    print(text)
    print(f"wrote {path}")
    if args.json:
        atomic_write_text(args.json, json.dumps({
            "comparisons": [{"a": c.a, "b": c.b, "mean": vars(c.mean),
                             "per_task": {t: vars(i) for t, i in c.per_task.items()}} for c in comparisons],
            "scores": {m: {t: s.score() for t, s in per.items()} for m, per in samples.items()},
            "hashes": hashes,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
