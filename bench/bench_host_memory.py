"""Host memory of a full-parameter DeepSpeed ZeRO-3 fine-tune on the CPU, per phase, against ``plan``.

Random fp32 weights at Qwen2.5-0.5B's width (896 wide, ``forgetting_ray.plan``'s built-in architecture) with
fewer layers and a smaller vocabulary (``--layers``, ``--vocab``), fine-tuned for ``--steps`` steps with the
product's own ``create_runner`` (DeepSpeed ZeRO-3 as ``build_deepspeed_config`` writes it, torch AdamW,
gradient checkpointing, sdpa) and ``forgetting_loss``: micro batch 1, 256 tokens, max_live_parameters 1e8,
max_reuse_distance 0, ``--reduce-bucket-size`` (DeepSpeed's 5e8 by default). No Ray: ``--world`` ranks are
subprocesses of this script over gloo (RANK / WORLD_SIZE), one for ``--world 1`` too, so that each measured
process starts clean and ``--unmap`` can set ``MALLOC_MMAP_THRESHOLD_=65536`` before it starts (glibc then
returns freed blocks of 64 KiB and more to the kernel instead of keeping them for reuse).

Each rank records, per step and phase (forward + loss, backward, optimizer step), RSS and RssAnon at the end of
the phase and the phase's peak (VmHWM, reset before it through /proc/self/clear_refs). The table compares,
from step 2 on (step 1 pays the first gathers and the allocator's growth), the steady state (median RSS after
the optimizer step) with ``plan.host_training_memory``'s total minus its transient part, and the peak (largest
phase VmHWM) with its total, for the exact reduced shape; the worst rank counts.

    python bench/bench_host_memory.py --layers 4 --vocab 32768 --unmap --out bench/results/host_memory/x.json
    python bench/bench_host_memory.py --report bench/results/host_memory/*.json   # the table from raw figures

About 1-2 min per configuration on 2 cores; each rank stays under 4 GiB at the sizes above.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 2**30
SHAPE = "qwen2.5-0.5b"
PHASES = ("forward", "backward", "optimizer")
UNMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}
FIRST_COUNTED_STEP = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--world", type=int, default=1, help="ranks (subprocesses over gloo)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq", type=int, default=256, help="tokens per micro batch (of 1 sequence)")
    p.add_argument("--reduce-bucket-size", type=float, default=5e8)
    p.add_argument("--unmap", action="store_true", help=f"run the ranks with {UNMAP}")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: CPUs / world)")
    p.add_argument("--model-dir", default=None, help="where the random model is built (kept; reused if there); "
                   "default a temporary folder, removed afterwards")
    p.add_argument("--out", default=None, help="raw figures (JSON); default bench/results/host_memory/<config>.json")
    p.add_argument("--report", nargs="+", metavar="FILE", help="print the table of earlier raw figures and stop")
    p.add_argument("--rank-out", default=None, help=argparse.SUPPRESS)  # set for the rank subprocesses
    return p.parse_args(argv)


def architecture(layers: int, vocab: int) -> dict:
    from forgetting_ray.plan import lookup_architecture

    return {**lookup_architecture(SHAPE)[1], "num_hidden_layers": layers, "vocab_size": vocab}


def config_name(a: argparse.Namespace) -> str:
    return (f"L{a.layers}_V{a.vocab}_w{a.world}_rbs{a.reduce_bucket_size:.0e}_"
            f"{'unmap' if a.unmap else 'default'}").replace("+", "")


# ------------------------------------------------------------------------------------------
# one rank (a subprocess)
# ------------------------------------------------------------------------------------------
def proc_status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def end_of_phase() -> dict[str, int]:
    s = proc_status()
    return {"rss": s["VmRSS"], "anon": s["RssAnon"], "hwm": s["VmHWM"]}


def batch(vocab: int, seq: int, gen):
    """One sequence: a quarter prompt (label -100), then negatives (class -1) for an eighth, positives after."""
    import torch

    ids = torch.randint(3, vocab, (1, seq), generator=gen)
    labels = ids.clone()
    labels[:, : seq // 4] = -100
    token_class = (labels != -100).long()
    token_class[:, seq // 4: seq // 4 + seq // 8] = -1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "token_class": token_class}


def run_rank(a: argparse.Namespace) -> None:
    import deepspeed  # noqa: F401  (imported here so that the baseline below includes it)
    import torch

    from forgetting_ray.config.finetune import TrainingConfig
    from forgetting_ray.losses import forgetting_loss
    from forgetting_ray.train.deepspeed_setup import create_runner

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(a.threads)
    ft = TrainingConfig.model_validate({
        "strategy": "forgetting", "max_steps": a.steps, "micro_batch_size": 1, "grad_accum": 1,
        "warmup_ratio": 0.0, "gradient_checkpointing": True, "lora": {"enabled": False},
        "deepspeed": {"enabled": True, "zero_stage": 3, "max_live_parameters": 100_000_000,
                      "max_reuse_distance": 0, "reduce_bucket_size": int(a.reduce_bucket_size)}})
    after_import, t0 = end_of_phase(), time.perf_counter()
    runner = create_runner(a.model_dir, ft, world_size=world, total_steps=a.steps, device=torch.device("cpu"),
                           chunk_size=None, attn_implementation="sdpa", dtype="float32")
    zc = runner.engine._config.zero_config
    rec = {"rank": rank, "init_s": time.perf_counter() - t0, "after_import": after_import,
           "after_init": end_of_phase(),
           "params": sum(getattr(p, "ds_numel", p.numel()) for p in runner.model.parameters()),
           "zero_config": {k: getattr(zc, k) for k in ("reduce_bucket_size", "sub_group_size", "max_live_parameters",
                                                       "max_reuse_distance", "param_persistence_threshold")},
           "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "steps": []}
    gen = torch.Generator().manual_seed(rank)
    for step in range(1, a.steps + 1):
        b, t = batch(a.vocab, a.seq, gen), time.perf_counter()
        reset_peak()
        loss = forgetting_loss(runner.forward(b), b["token_class"], 0.1, strategy="forgetting").loss
        row = {"step": step, "forward": end_of_phase()}
        reset_peak()
        runner.backward(loss, True)
        row["backward"] = end_of_phase()
        reset_peak()
        runner.step(True)
        row["optimizer"] = end_of_phase()
        row.update(loss=float(loss.detach()), seconds=time.perf_counter() - t)
        rec["steps"].append(row)
        print(f"rank {rank} step {step}: " + ", ".join(
            f"{k} rss {row[k]['rss'] / GIB:.3f} hwm {row[k]['hwm'] / GIB:.3f}" for k in PHASES), flush=True)
    Path(a.rank_out).write_text(json.dumps(rec))


# ------------------------------------------------------------------------------------------
# the parent: build the model, start the ranks, collect
# ------------------------------------------------------------------------------------------
def build_model(folder: Path, arch: dict) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "config.json").is_file():
        return
    kwargs = dict(arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs),
                                             dtype=torch.float32)
    model.save_pretrained(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(a: argparse.Namespace, argv: list[str]) -> dict:
    arch = architecture(a.layers, a.vocab)
    folder = Path(a.model_dir or tempfile.mkdtemp(prefix="bench_host_memory-"))
    t0 = time.perf_counter()
    try:
        build_model(folder, arch)
        build_s = time.perf_counter() - t0
        env = {k: v for k, v in os.environ.items() if k not in UNMAP}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(a.world),
                   **(UNMAP if a.unmap else {}))
        with tempfile.TemporaryDirectory() as tmp:
            outs = [Path(tmp) / f"rank{r}.json" for r in range(a.world)]
            procs = [subprocess.Popen([sys.executable, __file__, *argv, "--model-dir", str(folder), "--threads",
                                       str(a.threads), "--rank-out", str(out)],
                                      env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
                     for r, out in enumerate(outs)]
            if any(p.wait() for p in procs):
                raise SystemExit(f"a rank failed: exit codes {[p.returncode for p in procs]}")
            ranks = [json.loads(out.read_text()) for out in outs]
    finally:
        if a.model_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    import deepspeed
    import torch

    return {"date": date.today().isoformat(), "command": "python bench/bench_host_memory.py " + " ".join(argv),
            "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
                        "torch": torch.__version__, "deepspeed": deepspeed.__version__},
            "architecture": arch, "world": a.world, "steps": a.steps, "seq": a.seq, "threads": a.threads,
            "reduce_bucket_size": int(a.reduce_bucket_size), "env": UNMAP if a.unmap else {},
            "seconds": {"build": build_s, "total": time.perf_counter() - t0}, "ranks": ranks}


# ------------------------------------------------------------------------------------------
# the table, from the raw figures alone
# ------------------------------------------------------------------------------------------
def figures(raw: dict) -> dict:
    from forgetting_ray.plan import host_training_memory, model_shape

    shape = model_shape(raw["architecture"])
    plan = host_training_memory(shape, workers=raw["world"], lora=False, lora_r=0, zero_stage=3, micro_batch_size=1,
                                seq_len=raw["seq"], gradient_checkpointing=True,
                                reduce_bucket_size=raw["reduce_bucket_size"])
    counted = [[s for s in r["steps"] if s["step"] >= FIRST_COUNTED_STEP] for r in raw["ranks"]]
    steady = max(statistics.median(s["optimizer"]["rss"] for s in steps) for steps in counted)
    peak = max(s[ph]["hwm"] for steps in counted for s in steps for ph in PHASES)
    return {"params": shape.params, "params_runner": raw["ranks"][0]["params"], "steady": steady, "peak": peak,
            "after_import": max(r["after_import"]["rss"] for r in raw["ranks"]),
            "plan_total": plan.total, "plan_steady": plan.total - plan.parts.get("transient", 0), "parts": plan.parts}


def report(raws: list[tuple[str, dict]]) -> str:
    lines = ["| file | N | layers | vocab | world | allocator | reduce bucket | steady GiB | plan steady GiB | "
             "steady / plan | peak GiB | plan total GiB | peak / plan |",
             "|---|---:|---:|---:|---:|---|---:|" + "---:|" * 6]
    notes = []
    for name, raw in raws:
        f, arch = figures(raw), raw["architecture"]
        alloc = " ".join(f"{k}={v}" for k, v in raw["env"].items()) or "default"
        lines.append(f"| {name} | {f['params'] / 1e6:.1f} M | {arch['num_hidden_layers']} | {arch['vocab_size']} | "
                     f"{raw['world']} | {alloc} | {raw['reduce_bucket_size']:.0e} | {f['steady'] / GIB:.3f} | "
                     f"{f['plan_steady'] / GIB:.3f} | {f['steady'] / f['plan_steady']:.3f} | {f['peak'] / GIB:.3f} | "
                     f"{f['plan_total'] / GIB:.3f} | {f['peak'] / f['plan_total']:.3f} |")
        runner = "" if f["params_runner"] == f["params"] else f" (the runner counted {f['params_runner']})"
        notes.append(f"- {name}: {raw['date']}, {raw['steps']} steps x {raw['seq']} tokens, {raw['threads']} "
                     f"thread(s) per rank, {raw['seconds']['total']:.0f} s{runner}; RSS after the imports "
                     f"{f['after_import'] / GIB:.3f} GiB; plan's parts GiB: "
                     + ", ".join(f"{k} {v / GIB:.3f}" for k, v in f["parts"].items()))
    head = (f"Measured from step {FIRST_COUNTED_STEP} on, worst rank: steady = median RSS after the optimizer step, "
            "peak = largest VmHWM of a phase (forward, backward, optimizer); plan = "
            "forgetting_ray.plan.host_training_memory at the same shape (steady: total minus transient).")
    return "\n".join([head, "", *lines, "", *notes])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.report:
        print(report([(Path(p).name, json.loads(Path(p).read_text())) for p in a.report]))
        return 0
    a.threads = a.threads or max(1, (os.cpu_count() or 1) // a.world)
    if a.rank_out:
        run_rank(a)
        return 0
    out = Path(a.out or REPO / "bench/results/host_memory" / f"{config_name(a)}.json")
    raw = run(a, argv)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(raw, indent=1))
    print(report([(out.name, raw)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
