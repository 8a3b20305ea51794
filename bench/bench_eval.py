"""Benchmark: multiple-choice scoring with prefix (KV) reuse vs one full forward per choice.

Runs the native engine on the same seeded documents of TruthfulQA (MC1+MC2 choices, ~10 per
question, long shared preamble), LogiQA (4 choices) and BoolQ (2 one-token choices) with
``prefix_reuse`` off and on, in one process, interleaved (off, on, off, on, ...) over ``--repeats``;
each speed-up is paired within a repeat and the table gives the median over the repeats and their
range. The two must agree: the largest log-likelihood difference between them is reported too.

Usage: ``python bench/bench_eval.py [--n 16] [--repeats 3] [--out bench/results/eval_prefix_reuse.json]``
(SmolLM2-135M via the ``smollm2-135m`` alias; a few minutes on 2 CPU cores); ``--report FILE`` prints the
table again from the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = ("truthfulqa", "logiqa", "boolq")


def spread(values: list[float], fmt: str = ".2f") -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def report(res: dict) -> None:
    s = res["settings"]
    print(f"{res['date']}: model {s['model']}, fp32, {s['threads']} torch threads, batch {s['batch_size']}, "
          f"{s['repeats']} interleaved repeats; median [min, max] over the repeats\n")
    print("| task | docs | choices | naive ex/s | prefix-reuse ex/s | speed-up, paired | max abs Δ loglik |")
    print("|---|---|---|---|---|---|---|")
    for task, t in res["tasks"].items():
        naive = [t["docs"] / x for x in t["seconds"]["naive"]]
        fast = [t["docs"] / x for x in t["seconds"]["prefix_reuse"]]
        ratios = [a / b for a, b in zip(t["seconds"]["naive"], t["seconds"]["prefix_reuse"])]
        print(f"| {task} | {t['docs']} | {t['choices']} | {spread(naive)} | {spread(fast)} | **{spread(ratios)}x** "
              f"| {t['max_abs_diff']:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16, help="documents per task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved off/on pairs per task")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=None, help="benchmark folder; default: the files shipped in the package")
    ap.add_argument("--out", default=str(REPO / "bench/results/eval_prefix_reuse.json"), help="raw figures (JSON)")
    ap.add_argument("--report", metavar="FILE", help="print the table from raw figures written earlier and exit")
    args = ap.parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from forgetting_ray.config import EvalConfig, ModelConfig
    from forgetting_ray.eval import runner
    from forgetting_ray.eval.lm import Engine
    from forgetting_ray.models import load_model, load_tokenizer
    from forgetting_ray.store import atomic_write_text

    torch.set_num_threads(args.threads)
    mcfg = ModelConfig(name_or_path=args.model, cache_dir=str(REPO / ".cache") if args.model == "smollm2-135m" else None)
    model, tok = load_model(mcfg), load_tokenizer(mcfg)
    cfg = EvalConfig(data_dir=args.data_dir, limit=args.n, limit_mode="random", seed=0)

    res = {"date": time.strftime("%Y-%m-%d"), "settings": {k: getattr(args, k) for k in
                                                          ("model", "n", "batch_size", "threads", "repeats")},
           "tasks": {}}
    for task in TASKS:
        docs = runner.load_docs(task, cfg, tok)
        groups = [(r["context"], r["choices"]) for d in docs for r in runner.get_task(task).requests(d, cfg).values()]
        engines = {pr: Engine(model, tok, batch_size=args.batch_size, prefix_reuse=pr) for pr in (False, True)}
        engines[True].loglikelihood(groups[:2])  # warm-up (allocator, kernels)
        seconds: dict[str, list[float]] = {"naive": [], "prefix_reuse": []}
        out = {}
        for _ in range(args.repeats):
            for pr in (False, True):
                t = time.perf_counter()
                out[pr] = engines[pr].loglikelihood(groups)
                seconds["prefix_reuse" if pr else "naive"].append(time.perf_counter() - t)
        diff = max(abs(a.loglikelihood - b.loglikelihood) for ga, gb in zip(out[True], out[False]) for a, b in zip(ga, gb))
        res["tasks"][task] = {"docs": len(docs), "choices": sum(len(c) for _, c in groups), "seconds": seconds,
                              "max_abs_diff": diff}
        print(f"# {task}: {json.dumps(seconds)}", flush=True)
    atomic_write_text(args.out, json.dumps(res, indent=2) + "\n")
    report(res)


if __name__ == "__main__":
    main()
