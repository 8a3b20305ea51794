"""Benchmark: the training step's forgetting overhead and the per-step cost of its token masks.

1. Step time of ``strategy="forgetting"`` over plain SFT (``strategy="sft"``) on the same model and
   micro-batches: token_nll + loss + backward + AdamW, alternating, median of many steps (the
   CPUs are shared).  Target <= 1.05x: the forgetting term only adds a masked sum.
2. Per-step mask cost for corpora of 1k and 100k samples: what the loop does to get a step's
   classes (take the rank's rows of a global micro-batch, collate input_ids/labels/token_class,
   build the masks).  Target: flat in corpus size.  For contrast, the paper's approach (docs/method.md
   §11.13) finds each batch's tokens in corpus-wide positive/negative index lists; even done in
   vectorised numpy (the paper uses a Python loop) it grows with the corpus.

In-process, no Ray.  Usage: ``python bench/bench_train_step.py [--threads 2] [--steps 40]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def step_ratio(args) -> list[tuple[str, float, float]]:
    import torch
    import transformers as tf

    from forgetting_ray.losses import forgetting_loss
    from forgetting_ray.scoring import token_nll
    from forgetting_ray.train.loop import prepare_micro_batch

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(1)
    b, l = args.batch, args.length
    ids = torch.randint(0, cfg.vocab_size, (b, l), generator=g)
    labels = ids.clone()
    labels[:, : l // 4] = -100  # prompts
    cls = torch.where(torch.rand(b, l, generator=g) < 0.7, 1, -1).to(torch.int8) * (labels != -100)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "token_class": cls}

    def step(strategy: str) -> float:
        t0 = time.perf_counter()
        mb = prepare_micro_batch(batch, strategy)
        nll = token_nll(model, mb["input_ids"], mb["attention_mask"], mb["labels"])
        out = forgetting_loss(nll, mb["token_class"], 0.1, strategy=strategy)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for s in ("sft", "forgetting") * 3:  # warm-up
        step(s)
    times: dict[str, list[float]] = {"sft": [], "forgetting": []}
    for i in range(args.steps):
        order = ("sft", "forgetting") if i % 2 == 0 else ("forgetting", "sft")
        for s in order:
            times[s].append(step(s))
    return times


def step_table(times: dict[str, list[float]]) -> str:
    """Median step time per strategy and the forgetting / sft ratio of each alternating pair (median [p10, p90])."""
    pairs = np.array(times["forgetting"]) / np.array(times["sft"])
    lines = ["| strategy | ms/step: median [p10, p90] | ratio vs sft, paired per step: median [p10, p90] |",
             "|---|---|---|"]
    for s in ("sft", "forgetting"):
        ms = np.array(times[s]) * 1e3
        ratio = (f"{np.median(pairs):.3f} [{np.quantile(pairs, 0.1):.3f}, {np.quantile(pairs, 0.9):.3f}]"
                 if s == "forgetting" else "1")
        lines.append(f"| {s} | {np.median(ms):.1f} [{np.quantile(ms, 0.1):.1f}, {np.quantile(ms, 0.9):.1f}] | {ratio} |")
    return "\n".join(lines)


def synthetic_corpus(n: int, rng: np.random.Generator):
    """A partitioned token table of ``n`` samples (64-256 tokens, first quarter prompt, rho 0.7)."""
    import pyarrow as pa

    lengths = rng.integers(64, 257, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = int(offsets[-1])
    ids = rng.integers(0, 32000, total, dtype=np.int32)
    pos_in_row = np.arange(total) - np.repeat(offsets[:-1], lengths)
    prompt = pos_in_row < np.repeat(lengths // 4, lengths)
    labels = np.where(prompt, -100, ids).astype(np.int32)
    cls = np.where(prompt, 0, np.where(rng.random(total) < 0.7, 1, -1)).astype(np.int8)

    def col(values):
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    return pa.table({"input_ids": col(ids), "labels": col(labels), "token_class": col(cls)}), offsets, cls


class TableIterator:
    def __init__(self, table):
        self.table = table

    def iter_batches(self, *, batch_size, batch_format, drop_last, prefetch_batches):
        for start in range(0, self.table.num_rows, batch_size):
            yield self.table.slice(start, batch_size)


def mask_cost(args) -> list[tuple[int, float, float]]:
    from forgetting_ray.train.data_plan import DataPlan
    from forgetting_ray.train.loop import micro_batches

    rng = np.random.default_rng(0)
    rows = []
    for n in (1_000, 100_000):
        table, offsets, cls = synthetic_corpus(n, rng)
        plan = DataPlan(n, world_size=2, micro_batch_size=args.batch, grad_accum=1)
        it = micro_batches(TableIterator(table), plan, rank=0, skip=0, columns=("input_ids", "labels", "token_class"),
                           pad_token_id=0)
        t0 = time.perf_counter()
        k = 0
        for mb in it:
            pos, neg = mb["token_class"] > 0, mb["token_class"] < 0  # what the loss uses
            k += 1
            if k == args.mask_steps:
                break
        ours = (time.perf_counter() - t0) / k

        # paper-style: (sample, position) lists of the whole corpus, searched for each batch's samples
        sample_of_token = np.repeat(np.arange(n, dtype=np.int32), np.diff(offsets))
        pos_samples = sample_of_token[cls == 1]
        neg_samples = sample_of_token[cls == -1]
        reps = 5
        t0 = time.perf_counter()
        for s in range(reps):
            wanted = np.arange(s * 2 * args.batch, s * 2 * args.batch + args.batch * 2, 2)
            np.isin(pos_samples, wanted).nonzero()
            np.isin(neg_samples, wanted).nonzero()
        paper = (time.perf_counter() - t0) / reps
        rows.append((n, ours * 1e3, paper * 1e3))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per strategy")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--mask-steps", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "train_step.json"),
                    help="raw figures (JSON): every timed step, the mask costs")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(f"## forgetting vs SFT step (LlamaForCausalLM hidden 256, 4 layers, vocab 4096; "
          f"batch {args.batch}x{args.length}; {args.steps} steps each, alternating, the order flipped every pair)")
    times = step_ratio(args)
    print(step_table(times))
    print(f"\n## per-step mask cost (micro-batch {args.batch} rows of 64-256 tokens, rank 0 of 2)")
    print("| corpus samples | ours: ms/step (collate + masks) | paper-style index search: ms/step |\n|---|---|---|")
    rows = mask_cost(args)
    for n, ours, paper in rows:
        print(f"| {n:,} | {ours:.3f} | {paper:.2f} |")
    (n0, o0, p0), (n1, o1, p1) = rows
    print(f"\n100k/1k ratio: ours {o1 / o0:.2f}x, paper-style {p1 / p0:.1f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "args": vars(args), "step_seconds": times,
            "mask_cost_ms": [{"samples": n, "ours": o, "paper_style": p} for n, o, p in rows]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
