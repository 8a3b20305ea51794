"""GPU check: a few bf16 training steps of a 1B-shaped random Llama with the FORGETTING loss.

Builds Llama-3.2-1B's architecture (forgetting_ray.plan.ARCHITECTURES, random init, nothing is
downloaded), runs the training kernel of the package (``token_nll`` + ``forgetting_loss`` with random
token classes, AdamW) and prints tokens/s, model FLOPs utilisation and peak memory next to the
planner's activation estimate.

    python bench/gpu_check.py                      # on a machine with a CUDA GPU
    python bench/gpu_check.py --gradient-checkpointing --batch 4
    python bench/gpu_check.py --cpu-smoke          # tiny shape on CPU: checks the script itself

MFU = 6 * N * tokens/s / peak bf16 FLOP/s (dense), with N the parameters that take part in matmuls
(the input embedding only when it is tied to the output head).  "MFU+attn" adds the attention
matmuls, 12 * layers * hidden * seq per token (PaLM, appendix B).  Peaks come from PEAK_BF16 by GPU
name; pass --peak-tflops for others.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

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
SMOKE_SHAPE = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                   tie_word_embeddings=True)


def peak_flops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16:
        if key.lower() in device_name.lower():
            return peak
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.2-1b", help="architecture from forgetting_ray.plan (default llama-3.2-1b)")
    p.add_argument("--batch", type=int, default=2, help="sequences per step (default 2, the paper's per-GPU batch)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layer activations")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s if the GPU is not in the table")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shape on CPU in fp32 (checks the script, no MFU)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False). This check measures GPU "
              "throughput; run it on a GPU node, or pass --cpu-smoke to exercise the script on CPU.", file=sys.stderr)
        return 2

    from transformers import AutoConfig, AutoModelForCausalLM

    from forgetting_ray.losses import forgetting_loss
    from forgetting_ray.plan import activation_bytes, lookup_architecture, model_shape
    from forgetting_ray.scoring import token_nll

    if args.cpu_smoke:
        arch = dict(SMOKE_SHAPE)
        args.batch, args.seq, args.steps, args.warmup = 2, 64, 2, 1
        device, dtype, name = torch.device("cpu"), torch.float32, "cpu (smoke)"
    else:
        found = lookup_architecture(args.model)
        if found is None:
            print(f"gpu_check: unknown --model {args.model!r}", file=sys.stderr)
            return 2
        arch = dict(found[1])
        device, dtype = torch.device("cuda"), torch.bfloat16
        name = torch.cuda.get_device_name(device)
    model_type = arch.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **arch)
    shape = model_shape(cfg)

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: a 1B random init on CPU takes longer than the check
        # bf16 weights, as DeepSpeed's bf16 mode computes
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator(device="cpu").manual_seed(0)
    vocab = cfg.vocab_size

    def batch():
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        labels = ids.clone()
        labels[:, : args.seq // 10] = -100  # a prompt: not scored
        cls = torch.where(torch.rand(ids.shape, generator=g) < 0.7, 1, -1).to(torch.int8) * (labels != -100)
        return ids.to(device), labels.to(device), cls.to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, last, act_saved, states = [], None, 0, 0
    for step in range(args.warmup + args.steps):
        ids, labels, cls = batch()
        sync()
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0  # weights + AdamW states
        t0 = time.perf_counter()
        nll = token_nll(model, ids, torch.ones_like(ids), labels)
        last = forgetting_loss(nll, cls, lam=0.1)
        saved = torch.cuda.memory_allocated() - before if device.type == "cuda" else 0  # what backward will read
        last.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            act_saved, states = max(act_saved, saved), before
    if last is None or not torch.isfinite(last.loss.detach()):
        print(f"gpu_check: loss is not finite ({last.loss if last else None})", file=sys.stderr)
        return 1

    step_s = statistics.median(times)
    tokens_s = args.batch * args.seq / step_s
    n_matmul = shape.params - (0 if shape.tied_embeddings else shape.embedding_params)
    flops_tok = 6 * n_matmul
    flops_tok_attn = flops_tok + 12 * shape.num_layers * shape.hidden_size * args.seq
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (None if args.cpu_smoke else peak_flops(name))
    est_act = activation_bytes(shape, micro_batch_size=args.batch, seq_len=args.seq, lora=False, lora_r=0,
                               gradient_checkpointing=args.gradient_checkpointing, attention="sdpa")

    def mfu(f: float) -> str:
        return f"{f * tokens_s / peak:.1%}" if peak else "n/a"

    gib = 2**30
    rows = [
        ("device", name),
        ("model", f"{args.model if not args.cpu_smoke else 'tiny llama'}: {shape.params / 1e6:,.1f}M params "
                  f"({n_matmul / 1e6:,.1f}M in matmuls), {shape.num_layers} layers, hidden {shape.hidden_size}"),
        ("precision", f"{str(dtype).replace('torch.', '')} weights, AdamW, forgetting loss (lambda 0.1)"),
        ("batch", f"{args.batch} x {args.seq} tokens, gradient checkpointing "
                  f"{'on' if args.gradient_checkpointing else 'off'}"),
        ("steps", f"{args.steps} timed after {args.warmup} warmup; median {step_s * 1e3:,.1f} ms/step "
                  f"(min {min(times) * 1e3:,.1f}, max {max(times) * 1e3:,.1f})"),
        ("tokens/s", f"{tokens_s:,.0f}"),
        ("model TFLOP/s", f"{flops_tok * tokens_s / 1e12:,.2f} (6N), {flops_tok_attn * tokens_s / 1e12:,.2f} (6N+attn)"),
        ("peak bf16", f"{peak / 1e12:,.0f} TFLOP/s" if peak else "n/a (CPU or GPU not in PEAK_BF16; use --peak-tflops)"),
        ("MFU", f"{mfu(flops_tok)} (6N), {mfu(flops_tok_attn)} (6N+attn)"),
        ("loss", f"{float(last.loss.detach()):.4f} (pos NLL {float(last.pos_nll):.3f}, neg NLL {float(last.neg_nll):.3f})"),
    ]
    if device.type == "cuda":
        rows.append(("memory", f"peak {torch.cuda.max_memory_allocated() / gib:.1f} GiB allocated; weights + AdamW "
                               f"{states / gib:.1f} GiB; activations after forward {act_saved / gib:.2f} GiB vs plan "
                               f"estimate {est_act / gib:.2f} GiB (ratio {act_saved / est_act:.2f})"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
