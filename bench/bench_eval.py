"""Benchmark: multiple-choice scoring with prefix (KV) reuse vs one full forward per choice.

Runs the native engine on the same seeded documents of TruthfulQA (MC1+MC2 choices, ~10 per
question, long shared preamble), LogiQA (4 choices) and BoolQ (2 one-token choices) with
``prefix_reuse`` on and off, in one process, alternating, best of REPEATS (the CPUs are shared).
Reports examples/s and the speed-up ratio, and the largest log-likelihood difference between the
two (they must agree).

Usage: ``python bench/bench_eval.py [--n 16] [--batch-size 8] [--threads 2]`` (SmolLM2-135M via
the ``smollm2-135m`` alias; a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPEATS = 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16, help="documents per task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=None, help="benchmark folder; default: the files shipped in the package")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from forgetting_ray.config import EvalConfig, ModelConfig
    from forgetting_ray.eval import runner
    from forgetting_ray.eval.lm import Engine
    from forgetting_ray.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    mcfg = ModelConfig(name_or_path=args.model, cache_dir=str(REPO / ".cache") if args.model == "smollm2-135m" else None)
    model, tok = load_model(mcfg), load_tokenizer(mcfg)
    cfg = EvalConfig(data_dir=args.data_dir, limit=args.n, limit_mode="random", seed=0)

    rows = []
    for task in ("truthfulqa", "logiqa", "boolq"):
        docs = runner.load_docs(task, cfg, tok)
        groups = [(r["context"], r["choices"]) for d in docs for r in runner.get_task(task).requests(d, cfg).values()]
        engines = {pr: Engine(model, tok, batch_size=args.batch_size, prefix_reuse=pr) for pr in (False, True)}
        engines[True].loglikelihood(groups[:2])  # warm-up (allocator, kernels)
        best: dict[bool, float] = {True: float("inf"), False: float("inf")}
        out = {}
        for _ in range(REPEATS):
            for pr in (False, True):
                t = time.perf_counter()
                out[pr] = engines[pr].loglikelihood(groups)
                best[pr] = min(best[pr], time.perf_counter() - t)
        diff = max(abs(a.loglikelihood - b.loglikelihood) for ga, gb in zip(out[True], out[False]) for a, b in zip(ga, gb))
        n_choices = sum(len(c) for _, c in groups)
        rows.append((task, len(docs), n_choices, len(docs) / best[False], len(docs) / best[True],
                     best[False] / best[True], diff))

    print(f"model {args.model}, fp32, {args.threads} torch threads, batch {args.batch_size}, best of {REPEATS}\n")
    print("| task | docs | choices | naive ex/s | prefix-reuse ex/s | speed-up | max abs Δ loglik |")
    print("|---|---|---|---|---|---|---|")
    for task, n, c, naive, fast, ratio, diff in rows:
        print(f"| {task} | {n} | {c} | {naive:.2f} | {fast:.2f} | {ratio:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
