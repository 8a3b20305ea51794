"""Harmful responses: the setting where the premise of FORGETTING holds by construction.

A known share of the training responses (``--fraction``, default 30 %) are answers to *other* questions
(``swap``, as the noise check makes them): fluent, on-format and wrong. The reference model learns from a
disjoint clean set. Standard SFT is then trained on the wrong answers too; FORGETTING should push them
down and ``ignore`` should at least not learn them. This bench runs the product's own stages (prepare,
reference, score, partition, the sft / ignore / forgetting fine-tunes and, for the first ``--eval-seeds``
training seeds, the five benchmarks) and reports:

1. the reference before anything else: its mean response NLL against the base's on its own training data
   (the reference split) and on the training split it never saw;
2. the partition: the share of the corrupted tokens (token-exact: only characters the swap changed) that
   ended negative, against the base rate 1 - rho; the share of end-of-turn and answer-format tokens among the
   negatives; the base NLL of the negatives against the positives (quantiles and a coarse histogram);
3. per model and training seed, on clean held-out questions that no model saw: the mean NLL of the
   correct answer, and the share of questions whose correct answer is likelier than an answer swapped in
   from another held-out question (does the model still read the question?); on the corrupted training
   samples: the NLL of the wrong answers it was shown (did it learn them?); with intervals over seeds and
   examples (``seed_example_interval``: seeds crossed with the shared examples, docs/method.md §8);
4. the benchmark table with paired intervals over the evaluated training seeds and the documents.

With ``--fraction 0`` the same run is the clean-corpus study: the same reference, splits and probes, no
answer swapped in (the corruption figures are NaN and the wrong-answer probe drops out).

Every table is printed from one raw record (``--json``: the figures above, every probe's per-question values
and every benchmark's per-document values per model and seed); ``--tables RAW`` prints them again from a
committed record without running anything (``make tables`` does it for bench/results/studies/).

Usage (SmolLM2-135M, about an hour per training seed on 2 CPU cores; every stage is cached, so a rerun
with more seeds only trains the new ones):
    .venv/bin/python bench/bench_harmful_responses.py --seeds 0 1 2 --eval-seeds 3 --json out.json
Tiny random model (minutes, numbers meaningless): ``--model tiny``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("sft", "ignore", "forgetting")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="base model: alias, HF folder, or 'tiny'")
    ap.add_argument("--files", nargs="+", default=[str(REPO / "examples/data/flan_v2_cot/*.tsv")])
    ap.add_argument("--n-reference", type=int, default=200, help="clean samples for the reference model")
    ap.add_argument("--n-train", type=int, default=160, help="training samples (a fraction of them swapped)")
    ap.add_argument("--n-heldout", type=int, default=100, help="clean questions no model trains on")
    ap.add_argument("--fraction", type=float, default=0.3, help="share of training responses swapped")
    ap.add_argument("--rho", type=float, default=0.7)
    ap.add_argument("--ref-steps", type=int, default=80, help="reference optimizer steps")
    ap.add_argument("--train-steps", type=int, default=40, help="optimizer steps of every fine-tune")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4, help="learning rate of the fine-tunes")
    ap.add_argument("--ref-lr", type=float, default=1e-3, help="learning rate of the reference (LoRA)")
    ap.add_argument("--variant", nargs="*", default=[],
                    help="dotted overrides of a fourth model, FORGETTING with a selection variant, e.g. "
                         "selection.base_nll_floor=0.5 (none: not trained)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (init, dropout, order)")
    ap.add_argument("--eval-seeds", type=int, default=1, help="evaluate the benchmarks for the first N seeds")
    ap.add_argument("--eval-limit", type=int, default=100, help="documents per benchmark (seeded sample)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the data split and of the corruption")
    ap.add_argument("--run-dir", default="/tmp/forgetting-ray-bench-harmful")
    ap.add_argument("--n-boot", type=int, default=10_000)
    ap.add_argument("--json", default=None, help="also write the raw record (every figure, the per-question probe "
                    "values and the per-document benchmark values) to this JSON file")
    ap.add_argument("--tables", default=None, metavar="RAW_JSON",
                    help="run nothing: print the tables of a raw record that --json wrote")
    args = ap.parse_args()
    if args.tables:
        print(render(json.loads(Path(args.tables).read_text())))
        return
    for k, v in (("HF_HUB_OFFLINE", "1"), ("DS_ACCELERATOR", "cpu"), ("TOKENIZERS_PARALLELISM", "false"),
                 ("MLFLOW_DISABLE_TELEMETRY", "true"), ("RAY_AUTH_MODE", "disabled"),
                 ("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))):
        os.environ.setdefault(k, v)
    logging.basicConfig(level=logging.WARNING)

    from forgetting_ray.config import PipelineConfig, apply_overrides
    from forgetting_ray.data.readers import read_records, resolve_files
    from forgetting_ray.data.table import read_token_table
    from forgetting_ray.models import load_model, load_tokenizer
    from forgetting_ray.studies.corruption import corrupt_records, harmful_split, write_jsonl
    from forgetting_ray.studies.token_view import format_token_marks, load_token_view, token_exact_marks
    from forgetting_ray.pipeline import run_pipeline
    from forgetting_ray.report.study import read_eval_samples
    from forgetting_ray.scoring import mean_response_nll
    from forgetting_ray.stages.evaluate import resolve_eval_model
    from forgetting_ray.stages.prepare import run_prepare
    from forgetting_ray.store import atomic_path

    files = resolve_files(args.files)
    run_dir = Path(args.run_dir)
    model = args.model
    if model == "tiny":
        from forgetting_ray.tiny import build_demo_model, corpus_lines

        model = str(build_demo_model(run_dir / "tiny_model", corpus_lines(files)))
    ft = {"micro_batch_size": args.micro_batch, "grad_accum": args.grad_accum, "lr": args.lr, "warmup_ratio": 0.05,
          "deepspeed": {"enabled": False}, "export_dtype": "float32", "lora": {"enabled": True, "r": 16, "alpha": 16},
          "shuffle": True}  # seeded order: the corpus files come one source after another
    base = {
        "run_dir": str(run_dir),
        "model": {"name_or_path": model},
        "data": {"train_files": [str(f) for f in files], "max_length": args.max_length},
        "reference": {**ft, "max_steps": args.ref_steps, "lr": args.ref_lr},
        "training": {**ft, "max_steps": args.train_steps, "strategy": "forgetting", "t_max": 0.25},
        "selection": {"rho": args.rho},
        "baselines": ["sft", "ignore"],
        "eval_base_model": True,
        "scoring": {"concurrency": 2, "num_cpus_per_actor": 0.5, "batch_tokens": 4096, "shard_size": 128},
        "eval": {"limit": args.eval_limit, "limit_mode": "random", "seed": 1234, "backend": "local"},
        "resources": {"num_workers": 1, "cpus_per_worker": 2},
        "tracking": {"enabled": False},
    }
    records = list(read_records(files, PipelineConfig.model_validate(base).data))
    reference, train, heldout = harmful_split(records, args.n_reference, args.n_train, args.n_heldout, args.split_seed)
    corrupted = corrupt_records(train, args.fraction, "swap", args.split_seed)
    swapped_heldout = corrupt_records(heldout, 1.0, "swap", args.split_seed + 1)
    inputs = run_dir / "inputs"
    ref_path = write_jsonl(reference, inputs / "reference_clean.jsonl")
    train_path = write_jsonl(corrupted.records, inputs / f"train_swap_{args.fraction:g}.jsonl")
    base["data"].update(train_files=[str(train_path)], reference_files=[str(ref_path)], format="jsonl")
    print(f"model {args.model}: {len(reference)} clean reference samples, {len(train)} training samples of which "
          f"{corrupted.n_corrupted} carry another question's answer, {len(heldout)} clean held-out questions; "
          f"seeds {args.seeds}", flush=True)

    t0 = time.perf_counter()
    runs: dict[int, dict] = {}
    for i, seed in enumerate(args.seeds):
        raw = {**base, "training": {**base["training"], "seed": seed},
               "eval": {**base["eval"], "enabled": i < args.eval_seeds}}
        cfg = PipelineConfig.model_validate(raw)
        result = run_pipeline(cfg)
        models = {"sft": result.outputs["train-sft"], "ignore": result.outputs["train-ignore"],
                  "forgetting": result.outputs["train"]}
        evals = result.outputs.get("eval")
        if args.variant:
            vres = run_pipeline(PipelineConfig.model_validate(apply_overrides(
                {**raw, "baselines": [], "eval_base_model": False}, args.variant)))
            models["variant"] = vres.outputs["train"]
            if evals is not None:
                evals = {**evals, "variant": vres.outputs["eval"]["forgetting"]}
        runs[seed] = {"cfg": cfg, "result": result, "models": models, "evals": evals,
                      "variant_result": vres if args.variant else None}
        print(f"seed {seed}: done at {time.perf_counter() - t0:.0f} s", flush=True)

    # 1-2: the reference and the partition (the same for every training seed)
    first = runs[args.seeds[0]]
    tok = load_tokenizer(first["cfg"].model)
    marks = token_exact_marks(first["cfg"].model, corrupted)

    def partition_figures(part, score_dir) -> dict:
        view = load_token_view(part.train_path, score_dir, corrupted.bad_ids, marks)
        eot, fmt = format_token_marks(part.train_path, tok)
        neg, pos = view.token_class < 0, view.token_class > 0
        q = (0.1, 0.5, 0.9)
        record = json.loads((Path(part.dir) / "partition.json").read_text())
        return {
            "threshold": part.threshold, "negative_share": float(neg.mean()),
            "tokens": {k: record[k] for k in ("N", "n_positive", "n_negative", "n_ignored")},
            "score_range": [record["score_min"], record["score_max"]],
            "changed_tokens": int(view.changed.sum()),
            "changed_negative": float(neg[view.changed].mean()) if view.changed.any() else float("nan"),
            "corrupted_sample_tokens_negative": float(neg[view.bad].mean()) if view.bad.any() else float("nan"),
            "clean_tokens_negative": float(neg[~view.bad].mean()),
            "end_of_turn_negative": float(neg[eot].mean()), "answer_format_negative": float(neg[fmt].mean()),
            "negatives_end_of_turn_share": float(eot[neg].mean()), "negatives_answer_format_share": float(fmt[neg].mean()),
            "all_end_of_turn_share": float(eot.mean()), "all_answer_format_share": float(fmt.mean()),
            "base_nll_quantiles": {"negative": np.quantile(view.nll_base[neg], q).round(3).tolist(),
                                   "positive": np.quantile(view.nll_base[pos], q).round(3).tolist()},
            # a coarse histogram: share of each class's tokens per base-NLL bin (nats)
            "base_nll_bins": {"edges": BASE_NLL_EDGES,
                              "negative": _bin_shares(view.nll_base[neg]), "positive": _bin_shares(view.nll_base[pos])},
        }

    part = first["result"].outputs["partition"]
    reference_nll = json.loads((Path(part.dir) / "partition.json").read_text()).get("nll", {})
    partitions = {"forgetting": partition_figures(part, first["result"].outputs["score"].dir)}
    if args.variant:
        vpart = first["variant_result"].outputs["partition"]
        partitions["variant"] = partition_figures(vpart, first["variant_result"].outputs["score"].dir)

    # 3: NLL probes on held-out questions and on the wrong answers the models were shown
    probe_cfg = first["cfg"].model_copy(update={"data": first["cfg"].data.model_copy(update={
        "train_files": [str(write_jsonl(heldout + swapped_heldout.records + [r for r, bad in zip(
            corrupted.records, corrupted.corrupted) if bad], inputs / "probe.jsonl"))]})})
    probe_path = run_prepare(probe_cfg).train_path
    probe = read_token_table(probe_path).to_pylist()
    row_of = {r["sample_id"]: i for i, r in enumerate(probe)}
    pairs = [(c.sample_id, s.sample_id) for c, s, bad in zip(heldout, swapped_heldout.records,
                                                             swapped_heldout.corrupted)
             if bad and c.sample_id in row_of and s.sample_id in row_of]
    wrong_train = [row_of[sid] for sid in sorted(corrupted.bad_ids) if sid in row_of]
    correct, swapped = [row_of[c] for c, _ in pairs], [row_of[s] for _, s in pairs]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def sample_nll(path, table_path, rows) -> np.ndarray:
        # cached per (model, table): a rerun that adds seeds or evaluations scores only the new models
        cached = run_dir / "probes" / (hashlib.sha256(f"{path}|{table_path}".encode()).hexdigest()[:16] + ".npy")
        if cached.is_file():
            return np.load(cached)
        nll = mean_response_nll(load_model(resolve_eval_model(path)), rows, pad)
        with atomic_path(cached) as tmp, open(tmp, "wb") as f:
            np.save(f, nll)
        return nll

    # the reference's fit, before anything else: on its own training data and on the training split it never saw
    # (the same per-sample mean response NLL for both, so the two gains compare)
    prepared = first["result"].outputs["prepare"]
    reference_dir = first["result"].outputs["reference"].export_dir
    reference_fit = {}
    for split, table_path in (("reference split (seen)", prepared.reference_path),
                              ("training split (held out)", prepared.train_path)):
        rows = read_token_table(table_path).to_pylist()
        nll_base, nll_ref = (sample_nll(m, table_path, rows).mean() for m in (model, reference_dir))
        reference_fit[split] = {"samples": len(rows), "base": float(nll_base), "reference": float(nll_ref),
                                "gain_relative": float((nll_base - nll_ref) / nll_base)}

    def probes(path) -> dict[str, np.ndarray]:
        nll = sample_nll(path, probe_path, probe)
        out = {"heldout_correct_nll": nll[correct], "prefers_correct": (nll[correct] < nll[swapped]).astype(float),
               "margin": nll[swapped] - nll[correct]}
        if wrong_train:  # none with --fraction 0, the clean-corpus study
            out["wrong_answers_nll"] = nll[wrong_train]
        return out

    measured = {"base": {args.seeds[0]: probes(model)}}
    names = [*STRATEGIES, *(["variant"] if args.variant else [])]
    for name in names:
        measured[name] = {seed: probes(runs[seed]["models"][name].export_dir) for seed in args.seeds}

    # 4: the benchmarks' per-document values, for the evaluated seeds (the same documents for every model)
    eval_seeds = args.seeds[:args.eval_seeds]
    per_seed = [{name: read_eval_samples(r.out_dir, runs[s]["cfg"].eval.tasks) for name, r in runs[s]["evals"].items()}
                for s in eval_seeds]

    # Every table is rendered from this raw record, here and by --tables from the committed file, so a
    # table in the docs can be regenerated and diffed.
    raw = {
        "command": "python bench/bench_harmful_responses.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - t0),
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "tables", "run_dir")},
        "reference_nll": {k: v for k, v in reference_nll.items() if k != "base_nll_histogram"},
        "reference_fit": reference_fit, "partitions": partitions,
        "probes": {m: {str(s): {k: v.tolist() for k, v in d.items()} for s, d in per.items()}
                   for m, per in measured.items()},
        "benchmarks": {"seeds": eval_seeds, "per_seed": [
            {m: {t: x.to_raw() for t, x in tasks.items()}
             for m, tasks in samples.items()} for samples in per_seed]},
    }
    if args.json:
        with atomic_path(Path(args.json)) as tmp:
            Path(tmp).write_text(json.dumps(raw, indent=1, default=str) + "\n")
    print(render(json.loads(json.dumps(raw, default=str))))


def render(raw: dict) -> str:
    """Markdown of every figure of one run, from its raw record (the file ``--json`` writes)."""
    from forgetting_ray.report.study import TaskSamples, average_over_seeds, compare_models_over_seeds, pts, \
        score_table, seed_example_interval

    args = raw["args"]
    out = [f"`{raw['command']}` ({raw['date']})", ""]
    out += ["| split | samples | base NLL | reference NLL | lower by |", "|---|---:|---:|---:|---:|"]
    out += [f"| {split} | {f['samples']} | {f['base']:.3f} | {f['reference']:.3f} | {f['gain_relative']:.1%} |"
            for split, f in raw["reference_fit"].items()]
    nll = raw["reference_nll"]
    out += ["", f"Per token on the training split (the partition stage's record): {nll.get('mean_nll_base', float('nan')):.3f}"
            f" -> {nll.get('mean_nll_ref', float('nan')):.3f}, gain {nll.get('heldout_gain', float('nan')):.4f} nats."]
    for name, f in raw["partitions"].items():
        edges = f["base_nll_bins"]["edges"]
        bins = [f"[{lo:g}, {hi:g})" if hi != float("inf") else f"≥ {lo:g}" for lo, hi in zip(edges[:-1], edges[1:])]
        counts = f.get("tokens", {})  # (absent from records written before it was kept)
        out += ["", f"Partition ({_label(name, args)}): threshold {f['threshold']:+.4f}, {f['negative_share']:.1%} of the "
                f"tokens negative"
                + (f" ({counts['N']:,} response tokens: {counts['n_positive']:,} positive, {counts['n_negative']:,} "
                   f"negative, {counts['n_ignored']:,} left out; scores from {f['score_range'][0]:+.2f} to "
                   f"{f['score_range'][1]:+.2f})" if counts else "") + "; "
                + (f"changed tokens {f['changed_tokens']} ({f['changed_negative']:.1%} negative); "
                   if f["changed_tokens"] else "")
                + f"end-of-turn tokens {f['end_of_turn_negative']:.1%} negative ({f['negatives_end_of_turn_share']:.1%} of "
                f"the negatives); answer-format tokens {f['answer_format_negative']:.1%} negative "
                f"({f['negatives_answer_format_share']:.1%} of the negatives); base NLL p10 / p50 / p90 of the negatives "
                f"{' / '.join(f'{q:g}' for q in f['base_nll_quantiles']['negative'])} vs the positives "
                f"{' / '.join(f'{q:g}' for q in f['base_nll_quantiles']['positive'])}.", "",
                "| base NLL | " + " | ".join(bins) + " |", "|---|" + "---:|" * len(bins) + ""]
        out += [f"| {cls} | " + " | ".join(f"{x:.1%}" for x in f["base_nll_bins"][cls]) + " |"
                for cls in ("negative", "positive")]
    measured = {m: {int(s): {k: np.asarray(v) for k, v in d.items()} for s, d in per.items()}
                for m, per in raw["probes"].items()}
    names = [m for m in measured if m != "base"]
    out += ["", "Probes (mean [95 % interval over training seeds and questions, seeds crossed with the shared "
            "questions]):", "", _probe_table(measured, names, sorted(measured[names[0]]), seed_example_interval, args)]

    bench = raw["benchmarks"]
    if bench["seeds"]:
        per_seed = [{m: {t: TaskSamples.from_raw(t, x) for t, x in tasks.items()}
                     for m, tasks in samples.items()} for samples in bench["per_seed"]]
        pairs = [(a, b) for a, b in (("forgetting", "sft"), ("ignore", "sft"), ("forgetting", "ignore"), ("sft", "base"),
                                     ("forgetting", "base"), ("variant", "sft"), ("variant", "forgetting"))
                 if a in per_seed[0] and b in per_seed[0]]
        comparisons = [compare_models_over_seeds(per_seed, a, b, n_boot=args["n_boot"]) for a, b in pairs]
        tasks = sorted({t for c in comparisons for t in c.per_task})
        averaged = average_over_seeds(per_seed)
        out += ["", f"Benchmarks, training seeds {bench['seeds']}: per-document values averaged over the seeds, "
                f"{', '.join(f'{t} {len(x.values)}' for t, x in sorted(averaged['sft'].items()))} documents:", "",
                score_table({_label(m, args): x for m, x in averaged.items()}), "",
                "Differences in points, 95 % interval over the training seeds and the shared documents "
                "(docs/method.md §8), p from the same t, and the mean difference of each seed:", "",
                "| difference | " + " | ".join(tasks) + " | mean | p | per seed (" + " / ".join(map(str, bench["seeds"]))
                + ") |", "|---|" + "---:|" * (len(tasks) + 2) + "---|"]
        for c in comparisons:
            seeds = " / ".join(pts(np.mean([per[c.a][t].score() - per[c.b][t].score() for t in c.per_task]), True)
                               for per in per_seed)
            p = c.mean.p_two_sided
            out.append(f"| {_label(c.a, args)} − {_label(c.b, args)} | " + " | ".join(
                _ci(c.per_task[t]) for t in tasks) + f" | {_ci(c.mean)} | {'< 0.001' if p < 0.001 else f'{p:.3f}'} | "
                f"{seeds} |")
    return "\n".join(out)


def _label(name: str, args: dict) -> str:
    return f"forgetting + {' '.join(args['variant'])}" if name == "variant" else name


def _ci(i) -> str:
    from forgetting_ray.report.study import pts

    return f"{pts(i.estimate, True)} [{pts(i.low, True)}, {pts(i.high, True)}]"


BASE_NLL_EDGES = [0.0, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0, float("inf")]


def _bin_shares(nll: np.ndarray) -> list[float]:
    return (np.histogram(nll, bins=BASE_NLL_EDGES)[0] / max(len(nll), 1)).round(4).tolist()


def _probe_table(measured: dict, names: list[str], seeds: list[int], interval, args: dict) -> str:
    """Markdown: each probe per model (mean [95 % interval over seeds and examples]) and each strategy's
    difference from sft on the same examples."""
    cols = [("heldout_correct_nll", "held-out correct NLL", 1.0), ("prefers_correct", "prefers correct %", 100.0),
            ("margin", "swapped − correct NLL", 1.0), ("wrong_answers_nll", "NLL of the wrong answers shown", 1.0)]

    def cell(values: np.ndarray, scale: float) -> str:
        i = interval(values)
        digits = 1 if scale == 100.0 else 3
        return f"{scale * i.estimate:.{digits}f} [{scale * i.low:.{digits}f}, {scale * i.high:.{digits}f}]"

    cols = [c for c in cols if c[0] in next(iter(measured["base"].values()))]
    lines = ["| model | seeds | " + " | ".join(c[1] for c in cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for name in ["base", *names]:
        per = measured[name]
        lines.append(f"| {_label(name, args)} | {len(per)} | " + " | ".join(
            cell(np.stack([per[s][key] for s in per]), scale) for key, _, scale in cols) + " |")
    for name in names[1:]:
        lines.append(f"| {_label(name, args)} − sft | {len(seeds)} | " + " | ".join(
            cell(np.stack([measured[name][s][key] - measured["sft"][s][key] for s in seeds]), scale)
            for key, _, scale in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
