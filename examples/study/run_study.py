"""Run the FORGETTING vs SFT study with forgetting-ray's own pipeline and write docs/STUDY.md.

    .venv/bin/python examples/study/run_study.py --json docs/study/study_raw.json \
        --discussion docs/study/discussion.md                           # the full study (1.4-1.8 h, 2 CPU cores)
    .venv/bin/python examples/study/run_study.py --tables docs/study/study_raw.json \
        --discussion docs/study/discussion.md                           # docs/STUDY.md again from the record
    .venv/bin/python examples/study/run_study.py --tiny --out /tmp/STUDY.md run_dir=/tmp/study-tiny \
        reference.max_steps=2 training.max_steps=2 eval.limit=4         # a smoke run in a few minutes

Recipe: load examples/study/study.yaml (plus dotted overrides) -> ``run_pipeline`` (prepare ->
reference -> score -> partition -> sft, ignore and forgetting fine-tunes on the same data and steps
-> the five benchmarks for base, sft, ignore and forgetting; every finished stage and evaluation is
reused on a rerun, so an interrupted study continues where it stopped) -> read each evaluation's
per-example samples -> one raw record (``--json``: the config, every measured count, the training curves'
end points, the hashes and every model's per-example values) -> the paired bootstrap and the Markdown report,
rendered from that record.  ``--tables RAW`` renders the report again from a committed record without running
anything (``make tables`` does it for every committed report, ``COMMITTED_REPORTS``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = Path(__file__).with_name("study.yaml")
COMPARISONS = [("forgetting", "sft"), ("forgetting", "ignore"), ("ignore", "sft"), ("forgetting", "base"),
               ("sft", "base")]
# The committed reports, each (raw record, hand-written discussion, page): `make tables` renders each page from
# its record and tests/report/test_study_tables.py checks that it is exactly that.
COMMITTED_REPORTS = [
    ("docs/study/study_raw.json", "docs/study/discussion.md", "docs/STUDY.md"),
    ("docs/study/short_run_raw.json", "docs/study/short_run_discussion.md", "docs/study/short-run-28-steps.md"),
]
STUDY_RECORD, STUDY_DISCUSSION, STUDY_PAGE = COMMITTED_REPORTS[0]


def render_command(record: str, discussion: str | None, out: str) -> str:
    """The command that writes a report again from its committed record (paths inside the repo shown relative)."""
    def shown(path: str) -> str:
        try:
            return str(Path(path).resolve().relative_to(REPO))
        except ValueError:
            return path

    return " ".join(["python examples/study/run_study.py --tables", shown(record),
                     *(["--discussion", shown(discussion)] if discussion else []), "--out", shown(out)])


def _training_rows(outputs: dict) -> list[dict]:
    """First and last step of every fine-tune: did the forgetting term push the negatives up?"""
    rows = []
    for stage, res in outputs.items():
        if not (stage == "reference" or stage.startswith("train")) or not getattr(res, "metrics", None):
            continue
        first, last = res.metrics[0], res.metrics[-1]
        rows.append({"name": {"train": "forgetting (train)"}.get(stage, stage), "steps": res.global_step,
                     "first_pos_nll": first.get("pos_nll", float("nan")), "last_pos_nll": last.get("pos_nll", float("nan")),
                     "last_neg_nll": last.get("neg_nll", float("nan")), "last_lambda": last.get("lambda", 0.0)})
    return rows


def _training_table(rows: list[dict]) -> str:
    out = ["| fine-tune | steps | first pos NLL | last pos NLL | last neg NLL | last λ |",
           "|---|---:|---:|---:|---:|---:|"]
    out += [f"| {r['name']} | {r['steps']} | {r['first_pos_nll']:.3f} | {r['last_pos_nll']:.3f} | "
            f"{r['last_neg_nll']:.3f} | {r['last_lambda']:.3f} |" for r in rows]
    return "\n".join(out)


def raw_record(cfg, result, samples: dict, *, tiny: bool, n_boot: int, confidence: float) -> dict:
    """Everything the report says, measured or configured, before any of it is turned into text."""
    from forgetting_ray.config import config_to_dict
    from forgetting_ray.store import content_hash, file_sha256

    out = result.outputs
    prep, part = out["prepare"], out["partition"]
    manifest = prep.read_manifest()
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
            label = {"train": f"train ({cfg.training.strategy})"}.get(stage, stage)
            hashes[f"{label} key"] = res.key
            if res.export_dir is not None and (Path(res.export_dir) / "manifest.json").is_file():
                hashes[f"{label} export manifest sha256"] = file_sha256(Path(res.export_dir) / "manifest.json")
    for name, r in out["eval"].items():
        hashes[f"eval {name} results.json sha256"] = file_sha256(r.results_path)
    return {
        "command": " ".join(["python", "examples/study/run_study.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "model": cfg.model.name_or_path if not tiny else "tiny random Llama (--tiny smoke run)",
        "tiny": tiny,
        "config": config_to_dict(cfg),
        "sets": {s: {k: manifest["sets"][s][k] for k in ("n_samples", "n_response_tokens")}
                 for s in ("train", "reference")},
        "partition": {"n_positive": part.n_positive, "n_negative": part.n_negative, "threshold": part.threshold},
        "steps": {"reference": out["reference"].global_step, "train": out["train"].global_step},
        "stage_seconds": dict(result.seconds),
        "training": _training_rows(out),
        "hashes": hashes,
        "n_boot": n_boot, "confidence": confidence, "bootstrap_seed": cfg.seed,
        "samples": {m: {t: x.to_raw() for t, x in per.items()} for m, per in samples.items()},
    }


def render(raw: dict, discussion: str | None = None,
           command: str | None = render_command(STUDY_RECORD, STUDY_DISCUSSION, STUDY_PAGE)) -> str:
    """The report (docs/STUDY.md) from a raw record; the intervals are recomputed here, seeded as in the run.
    ``command`` is the line the report names for rendering it again (None: the record was not kept)."""
    from forgetting_ray.report.study import StudyReport, TaskSamples, compare_models

    samples = {m: {t: TaskSamples.from_raw(t, x) for t, x in per.items()} for m, per in raw["samples"].items()}
    comparisons = [compare_models(samples, a, b, n_boot=raw["n_boot"], confidence=raw["confidence"],
                                  seed=raw["bootstrap_seed"]) for a, b in COMPARISONS if a in samples and b in samples]
    cfg, sets, part, steps = raw["config"], raw["sets"], raw["partition"], raw["steps"]
    ref, tr, workers, ev = cfg["reference"], cfg["training"], cfg["resources"]["num_workers"], cfg["eval"]
    model = raw["model"]
    task_n = {t: len(next(iter(samples.values()))[t].values) for t in ev["tasks"]}
    setup = [
        f"base model: `{model}`; data: `{', '.join(cfg['data']['train_files'])}`, max_length {cfg['data']['max_length']}",
        (f"prepare: {sets['train']['n_samples']} training samples ({sets['train']['n_response_tokens']} response "
         f"tokens), {sets['reference']['n_samples']} disjoint reference samples"),
        (f"reference SFT: {steps['reference']} steps x {ref['micro_batch_size'] * ref['grad_accum']} sequences x "
         f"{workers} worker(s), lr {ref['lr']}, "
         + (f"LoRA r={ref['lora']['r']}" if ref["lora"]["enabled"] else "full weights")),
        (f"partition: rho = {cfg['selection']['rho']}: {part['n_positive']} positive / {part['n_negative']} negative "
         f"tokens of {part['n_positive'] + part['n_negative']}, threshold {part['threshold']}"),
        (f"fine-tunes (sft, ignore, forgetting): the same {steps['train']} steps x "
         f"{tr['micro_batch_size'] * tr['grad_accum']} sequences x {workers} worker(s), same order, "
         f"lr {tr['lr']}, LoRA r={tr['lora']['r']}; forgetting: λ {tr['lambda_schedule']} to t_max = {tr['t_max']}, "
         f"{tr['normalization']} normalisation"),
        (f"evaluation: harness `{ev['harness']}`, seeded subsets (limit {ev['limit']}, mode "
         f"`{ev['limit_mode']}`, seed {ev['seed']}): " + ", ".join(f"{t} {n}" for t, n in task_n.items())),
        (f"stage wall times ({raw['date']}): " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in raw["stage_seconds"].items())
         + " (a resumed run only counts what it redid)"),
    ]
    if command:
        setup.append(f"raw record: every model's per-example values, the counts and hashes above; this report is "
                     f"rendered from it by `{command}`")
    notes = [
        (f"Scale: `{model}`, {sets['train']['n_samples']} training samples and {steps['train']} "
         f"{'LoRA' if tr['lora']['enabled'] else 'full-weight'} steps on CPU; the paper's setting is 1B-8B models on "
         "50k samples. A difference that is within noise here says the study cannot tell the methods apart at "
         "this size, not that they are equal."),
        ("The intervals are over the evaluation examples only (which benchmark questions were drawn); they do not "
         "cover training randomness (seed, data order), which a single run cannot measure."),
    ]
    report = StudyReport("FORGETTING vs standard SFT on SmolLM2-135M" if not raw["tiny"] else
                         "Study smoke run (--tiny: random model, numbers are meaningless)",
                         setup, samples, comparisons, raw["hashes"], training=_training_table(raw["training"]),
                         notes=notes)
    text = report.markdown()
    if discussion:
        text = text.rstrip("\n") + "\n\n## Discussion\n\n" + discussion.strip() + "\n"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="FORGETTING vs SFT study -> docs/STUDY.md")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="study config (default: examples/study/study.yaml)")
    ap.add_argument("--out", default=str(REPO / "docs" / "STUDY.md"), help="where to write the report")
    ap.add_argument("--tiny", action="store_true", help="random tiny model (smoke test of the whole script)")
    ap.add_argument("--n-boot", type=int, default=10_000, help="bootstrap replicates")
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--json", default=None,
                    help="also write the raw record (config, counts, hashes, every per-example value) to this file")
    ap.add_argument("--tables", default=None, metavar="RAW_JSON",
                    help="run nothing: write the report again from a raw record that --json wrote")
    ap.add_argument("--discussion", default=None,
                    help="a hand-written Markdown file appended as the report's Discussion (for a committed run)")
    ap.add_argument("--committed", action="store_true",
                    help="run nothing: write every committed report again from its record (make tables)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. eval.limit=50")
    args = ap.parse_args(argv)
    from forgetting_ray.store import atomic_write_text

    if (args.tables or args.committed) and args.overrides:
        ap.error("--tables and --committed render a finished run's record; config overrides do not apply")
    rerender = [(REPO / r, REPO / d, REPO / p) for r, d, p in COMMITTED_REPORTS] if args.committed else \
        [(args.tables, args.discussion, args.out)] if args.tables else []
    for record, discussion_file, out in rerender:
        raw = json.loads(Path(record).read_text(encoding="utf-8"))
        discussion = Path(discussion_file).read_text(encoding="utf-8") if discussion_file else None
        text = render(raw, discussion, render_command(str(record), discussion_file and str(discussion_file), str(out)))
        print(f"wrote {atomic_write_text(out, text)}")
    if rerender:
        return 0

    discussion = Path(args.discussion).read_text(encoding="utf-8") if args.discussion else None

    for k, v in (("HF_HUB_OFFLINE", "1"), ("DS_ACCELERATOR", "cpu"), ("TOKENIZERS_PARALLELISM", "false"),
                 ("MLFLOW_DISABLE_TELEMETRY", "true"), ("RAY_AUTH_MODE", "disabled"),
                 ("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))):
        os.environ.setdefault(k, v)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from forgetting_ray.config import load_config
    from forgetting_ray.pipeline import run_pipeline, use_tiny_model
    from forgetting_ray.report.study import read_eval_samples

    cfg = load_config(args.config, args.overrides)
    if args.tiny:
        cfg = use_tiny_model(cfg)
    result = run_pipeline(cfg)
    evals = result.outputs["eval"]  # model name -> EvalResult (base first, the configured strategy last)
    samples = {name: read_eval_samples(r.out_dir, cfg.eval.tasks) for name, r in evals.items()}
    # The samples must reproduce the stage's own headline numbers, or we are reading the wrong field.
    for name, r in evals.items():
        for task, value in r.headline.items():
            mine = samples[name][task].score()
            if abs(mine - value) > 1e-9:
                raise RuntimeError(f"{r.out_dir}: {task} headline {value} but the samples give {mine}")
    raw = raw_record(cfg, result, samples, tiny=args.tiny, n_boot=args.n_boot, confidence=args.confidence)
    # The record is written first: a report can always be rendered again from it.
    if args.json:
        atomic_write_text(args.json, json.dumps(raw, indent=1) + "\n")
    text = render(json.loads(json.dumps(raw)), discussion,
                  render_command(args.json, args.discussion, args.out) if args.json else None)
    path = atomic_write_text(args.out, text)
    print(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
