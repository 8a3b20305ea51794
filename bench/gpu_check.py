"""GPU check: forgetting-ray's own stages on the GPUs it finds, at a real model shape.

What runs (nothing is downloaded; the shipped FLAN CoT corpus, a random model of Llama-3.2-1B's shape by default,
with a small BPE tokenizer trained on the corpus):

1. prepare -> reference: Ray Train + DeepSpeed ZeRO-3 in bf16 over NCCL, one worker per GPU, LoRA SFT;
2. score: Ray Data, one scoring actor per GPU (base and reference models, bf16);
3. partition, then train with FORGETTING twice on the same scores: LoRA, then a full fine-tune (ZeRO-3,
   activation checkpointing on); each export is written as safetensors and validated by the train stage.

It reports, per fine-tune: tokens/s (all GPUs, median over the steps after the first few), MFU and rank 0's peak
GPU memory against `plan`'s estimate; for scoring, tokens/s and MFU.  MFU = model FLOPs/s / (GPUs * peak bf16
FLOP/s), the FLOPs counted by `forgetting_ray.flops`: 6N per token for a full fine-tune, 4N for LoRA (no weight
gradients for the frozen base), 2N per model for scoring, the output head only on the positions that reach it,
attention included; "hardware" adds the forward that activation checkpointing recomputes.  Peaks come from
PEAK_BF16 by GPU name; pass --peak-tflops for others (on the CPU rehearsal too, to check the arithmetic).

    python bench/gpu_check.py                        # every GPU Ray sees on this machine
    python bench/gpu_check.py --address auto         # a running Ray cluster's GPUs (multi-node ZeRO-3)
    python bench/gpu_check.py --cpu-rehearsal        # tiny shape, the CPU standing in for one GPU (gloo):
                                                     # checks this script and the GPU configuration's code path
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense bf16 tensor-core peaks (vendor datasheets); first substring match of the device name wins.
PEAK_BF16: list[tuple[str, float]] = [
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]
REHEARSAL_SHAPE = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
                       tie_word_embeddings=True)
WARMUP_STEPS = 3  # not timed: kernel selection, the allocator, DeepSpeed's first gathers


def peak_flops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16:
        if key.lower() in device_name.lower():
            return peak
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.2-1b", help="shape from forgetting_ray.plan (default llama-3.2-1b)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start one on this machine)")
    p.add_argument("--gpus", type=int, default=None, help="training workers / scoring actors (default: every GPU)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per micro-batch (default 8)")
    p.add_argument("--max-length", type=int, default=1024, help="data.max_length (default 1024)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per fine-tune (default 20)")
    p.add_argument("--samples", type=int, default=2000, help="corpus samples to prepare (default 2000)")
    p.add_argument("--run-dir", default=None, help="where the run goes (default: a folder under /tmp)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s if the GPU is not in the table")
    p.add_argument("--cpu-rehearsal", action="store_true",
                   help="tiny shape, one CPU worker standing in for a GPU (resources.cpu_stands_in_for_gpu)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def build_model(shape: dict, out: Path, corpus: list[str], on_gpu: bool) -> Path:
    """A random model of ``shape`` (safetensors, bf16 on a GPU) with a BPE tokenizer trained on ``corpus``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from forgetting_ray import tiny

    if (out / "config.json").is_file():
        return out
    tiny.build_tokenizer(corpus, out / "tokenizer", vocab_size=512, chat_template=True)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    arch = dict(shape)
    cfg = AutoConfig.for_model(arch.pop("model_type"), **arch, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if on_gpu else "cpu"):  # a 1B random init on the CPU takes longer than the check
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if on_gpu else torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def pipeline_config(args: argparse.Namespace, run_dir: Path, model: Path, workers: int):
    from forgetting_ray.config import PipelineConfig

    gpu = not args.cpu_rehearsal
    finetune = {"max_steps": args.steps, "micro_batch_size": args.micro_batch, "grad_accum": 1, "lr": 1e-4,
                "warmup_ratio": 0.0, "report_every": 5, "gradient_checkpointing": True,
                "deepspeed": {"enabled": True, "zero_stage": 3}, "lora": {"enabled": True, "r": 64, "alpha": 16},
                "export_dtype": "bfloat16" if gpu else "float32"}
    return PipelineConfig.model_validate({
        "run_dir": str(run_dir),
        "model": {"name_or_path": str(model), "dtype": "auto", "attn_implementation": "sdpa"},
        "data": {"train_files": [str(REPO / "examples/data/flan_v2_cot_full/*.tsv")], "max_samples": args.samples,
                 "max_length": args.max_length, "reference_fraction": 0.25},
        "reference": finetune,
        "training": {**finetune, "strategy": "forgetting"},
        "scoring": {"concurrency": workers, "num_gpus_per_actor": 1, "num_cpus_per_actor": 1 if gpu else 0.5,
                    "batch_tokens": 32768 if gpu else 2048},
        "eval": {"enabled": False},
        "baselines": [],
        "resources": {"ray_address": args.address, "num_workers": workers, "use_gpu": True,
                      "cpus_per_worker": 2 if gpu else 1, "cpu_stands_in_for_gpu": args.cpu_rehearsal},
        "tracking": {"enabled": False, "system_metrics": True},  # rank 0's GPU memory with each step
    })


def mfu(flops_per_token: dict[str, float], tokens_s: float, workers: int, peak: float | None) -> dict:
    return {k: (f * tokens_s / (workers * peak) if peak else None) for k, f in flops_per_token.items()}


def scoring_figures(stats: dict, train_table, shape, cfg, workers: int, peak: float | None) -> dict:
    """tokens/s and MFU of the score stage: two forwards (base and reference) per token; an actor's peak host
    memory against plan's CPU estimate (meaningful on the CPU rehearsal, where the actors compute on the CPU)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from forgetting_ray.flops import scoring_flops
    from forgetting_ray.plan import scoring_actor_memory

    tokens = stats.get("real_tokens", 0.0)
    if not tokens:  # the scores came from an earlier run's cache: nothing was timed
        return {"tokens_per_s": None, "flops_per_token": None, "mfu": {"model": None}}
    labels = pq.read_table(train_table, columns=["labels"]).column("labels")
    head_tokens = pc.sum(pc.not_equal(pc.list_flatten(labels), -100)).as_py()
    tokens_s = tokens / max(stats["score_s"], 1e-9)
    work = scoring_flops(shape, tokens=tokens, head_tokens=head_tokens, seq_len=tokens / len(labels))
    per_token = {"model": work.model / tokens}
    host = scoring_actor_memory(shape, adapter_reference=cfg.reference.lora.enabled, lora_r=cfg.reference.lora.r,
                                batch_tokens=cfg.scoring.batch_tokens, max_length=cfg.data.max_length,
                                chunk_size=cfg.scoring.chunk_size)
    return {"tokens_per_s": tokens_s, "tokens": tokens, "head_tokens": head_tokens, "rows": len(labels),
            "flops_per_token": per_token, "mfu": mfu(per_token, tokens_s, workers, peak),
            "actor_peak_rss_gib": stats.get("actor_peak_rss_bytes", 0.0) / 2**30, "plan_host_gib": host.total / 2**30}


def fine_tune_figures(name: str, res, shape, cfg, workers: int, peak: float | None) -> dict:
    """tokens/s, MFU and rank 0's peak memory against the plan, from the fit's step metrics; every rank's peak
    host memory against plan's CPU estimate (meaningful on the CPU rehearsal)."""
    from forgetting_ray.flops import finetune_flops
    from forgetting_ray.plan import host_training_memory, plan

    ft = cfg.training
    rows = res.metrics[WARMUP_STEPS:] or res.metrics
    tokens_s = statistics.median(r["tokens_per_s"] for r in rows)
    tokens, head_tokens = sum(r["n_tokens"] for r in rows), sum(r["n_pos"] + r["n_neg"] for r in rows)
    mean_seq = tokens / len(rows) / (ft.micro_batch_size * ft.grad_accum * workers)
    work = finetune_flops(shape, tokens=tokens, head_tokens=head_tokens,
                          seq_len=mean_seq, lora=ft.lora.enabled,
                          lora_params=shape.lora_params(ft.lora.r) if ft.lora.enabled else 0,
                          recompute=ft.gradient_checkpointing)
    per_token = {"model": work.model / tokens, "hardware": work.hardware / tokens}
    est = plan(cfg.model.name_or_path, num_nodes=1, gpus_per_node=workers, lora=ft.lora.enabled, zero_stage=3,
               offload="none", micro_batch_size=ft.micro_batch_size, seq_len=cfg.data.max_length, lora_r=ft.lora.r,
               lora_targets=ft.lora.target_modules, gradient_checkpointing=ft.gradient_checkpointing, attention="sdpa")
    peak_gib = max((r.get("system/rank0_gpu_peak_gib", 0.0) for r in res.metrics), default=0.0)
    host = host_training_memory(shape, workers=workers, lora=ft.lora.enabled, lora_r=ft.lora.r, zero_stage=3,
                                micro_batch_size=ft.micro_batch_size, seq_len=cfg.data.max_length,
                                gradient_checkpointing=ft.gradient_checkpointing,
                                reduce_bucket_size=ft.deepspeed.reduce_bucket_size)
    return {
        "fine_tune": name, "steps": res.global_step, "export": str(res.export_dir),
        "tokens_per_s": tokens_s, "mean_tokens_per_sequence": mean_seq, "flops_per_token": per_token,
        "tokens": tokens, "head_tokens": head_tokens,
        "mfu": mfu(per_token, tokens_s, workers, peak),
        "peak_gpu_gib_rank0": peak_gib or None,
        "plan_gpu_gib": est.gpu_total_bytes / 2**30,
        "peak_rss_gib": [b / 2**30 for b in res.peak_rss_bytes], "plan_host_gib": host.total / 2**30,
        "final_loss": res.final_metrics.get("loss"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from forgetting_ray.config import config_to_dict
    from forgetting_ray.plan import lookup_architecture, model_shape
    from forgetting_ray.cluster.session import init_ray
    from forgetting_ray.stages.partition import run_partition
    from forgetting_ray.stages.prepare import run_prepare
    from forgetting_ray.stages.score import run_score
    from forgetting_ray.stages.train import run_finetune
    from forgetting_ray.tiny import corpus_lines

    if args.cpu_rehearsal:
        shape_cfg, device_name = dict(REHEARSAL_SHAPE), "cpu (rehearsal)"
        args.micro_batch, args.max_length = min(args.micro_batch, 2), min(args.max_length, 256)
        ray = init_ray(args.address, num_cpus=2, num_gpus=1)  # one GPU slot the CPU stands in for
    else:
        found = lookup_architecture(args.model)
        if found is None:
            print(f"gpu_check: unknown --model {args.model!r}", file=sys.stderr)
            return 2
        shape_cfg = dict(found[1])
        ray = init_ray(args.address)
        if not ray.cluster_resources().get("GPU"):
            print("gpu_check: the Ray cluster has no GPUs. Run it on a GPU machine (or --address a GPU cluster), "
                  "or pass --cpu-rehearsal to check the script on the CPU.", file=sys.stderr)
            return 2
        device_name = ray.get(ray.remote(num_gpus=1)(lambda: __import__("torch").cuda.get_device_name(0)).remote())
    workers = args.gpus or int(ray.cluster_resources().get("GPU", 1))
    run_dir = Path(args.run_dir or f"/tmp/forgetting-ray-gpu-check-{args.model if not args.cpu_rehearsal else 'rehearsal'}")
    corpus = corpus_lines(sorted((REPO / "examples/data/flan_v2_cot_full").glob("*.tsv")))
    model = build_model(shape_cfg, run_dir / "model", corpus, on_gpu=not args.cpu_rehearsal and torch.cuda.is_available())
    cfg = pipeline_config(args, run_dir, model, workers)
    shape = model_shape(str(model), lora_targets=cfg.training.lora.target_modules)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (None if args.cpu_rehearsal else peak_flops(device_name))

    timings: dict[str, float] = {}

    def timed(name, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        timings[name] = time.perf_counter() - t0
        print(f"gpu_check: {name} done in {timings[name]:.1f} s", flush=True)
        return out

    prep = timed("prepare", run_prepare, cfg)
    ref = timed("reference (LoRA SFT)", run_finetune, cfg, "reference", prep.reference_path)
    scores = timed("score", run_score, cfg, prep.train_path, ref.export_dir)
    part = timed("partition", run_partition, cfg, prep.train_path, scores.dir)
    lora = timed("train (LoRA)", run_finetune, cfg, "train", part.train_path)
    full_cfg = cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"lora": cfg.training.lora.model_copy(update={"enabled": False})})})
    full = timed("train (full)", run_finetune, full_cfg, "train", part.train_path)

    figures = {
        "device": device_name, "gpus": workers, "model": args.model if not args.cpu_rehearsal else "tiny llama",
        "params": shape.params, "peak_bf16_tflops": peak / 1e12 if peak else None, "stage_seconds": timings,
        "scoring": scoring_figures(scores.stats, prep.train_path, shape, cfg, workers, peak),
        "fine_tunes": [fine_tune_figures("LoRA r64", lora, shape, cfg, workers, peak),
                       fine_tune_figures("full", full, shape, full_cfg, workers, peak)],
        "config": config_to_dict(cfg),
    }
    print(report(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return 0


def report(f: dict) -> str:
    def pct(x):
        return f"{x:.1%}" if x is not None else "n/a"

    lines = [f"device        {f['device']} x {f['gpus']}",
             f"model         {f['model']}: {f['params'] / 1e6:,.1f}M params, random weights",
             f"peak bf16     {f['peak_bf16_tflops']:,.0f} TFLOP/s per GPU" if f["peak_bf16_tflops"] else
             "peak bf16     n/a (CPU, or a GPU not in PEAK_BF16: --peak-tflops)",
             "stages        " + ", ".join(f"{k} {v:.1f} s" for k, v in f["stage_seconds"].items()),
             f"scoring       {f['scoring']['tokens_per_s'] or 0:,.0f} tokens/s (base + reference NLL, all actors), "
             f"MFU {pct(f['scoring']['mfu']['model'])}, actor host peak {f['scoring']['actor_peak_rss_gib']:.2f} GiB "
             f"(plan on CPUs {f['scoring']['plan_host_gib']:.2f})"]
    for t in f["fine_tunes"]:
        mem = (f"rank-0 peak {t['peak_gpu_gib_rank0']:.1f} GiB vs plan {t['plan_gpu_gib']:.1f} GiB"
               if t["peak_gpu_gib_rank0"] else f"plan {t['plan_gpu_gib']:.1f} GiB (no GPU memory measured)")
        lines.append(f"{t['fine_tune']:<13} {t['tokens_per_s']:,.0f} tokens/s, MFU {pct(t['mfu']['model'])} "
                     f"(hardware {pct(t['mfu']['hardware'])}), {mem}, {t['steps']} steps, loss {t['final_loss']:.3f}, "
                     f"export {t['export']}; host peak per rank "
                     f"{', '.join(f'{g:.2f}' for g in t['peak_rss_gib'])} GiB (plan on CPUs {t['plan_host_gib']:.2f})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
