"""Controlled-noise check: do the scores find tokens we know are bad?

Corrupts the responses of a known fraction of FLAN CoT training samples (``--modes``: responses
swapped between samples, words shuffled, letters scrambled), keeps a disjoint clean set for the
reference model, and runs the real prepare -> reference -> score -> partition stages on Ray.  Then
it measures, over all response tokens, how well score = NLL_base - NLL_ref separates corrupted from
clean tokens (AUROC; the sample-level AUROC uses each sample's mean score) and how much of the
negative class (bottom 1 - rho) is corrupted (precision) and how much of the corruption it holds
(recall), next to what a random split of the same sizes gets.  A sign-flipped score would give
1 - AUROC (column "sign-flip").

Usage (SmolLM2-135M, about 10-15 min on 2 busy CPU cores):
    .venv/bin/python bench/bench_noise_recovery.py
    .venv/bin/python bench/bench_noise_recovery.py --modes swap --fraction 0.3 --ref-steps 40
    .venv/bin/python bench/bench_noise_recovery.py --modes --controls --ref-steps 80 --lr 1e-3  # controls only
Tiny random model (seconds): ``--model tiny``.  ``--json RAW`` writes the raw record (arguments, every
figure the tables show, each stage's key and seconds); ``--tables RAW`` prints the Markdown tables again from
a committed record without running anything (``make tables`` does it for bench/results/noise/).  ``--controls`` also runs the positive controls
(``forgetting_ray.studies.experiments.run_positive_controls``: a sentence the reference corpus teaches, planted
into a quarter of the training responses, must come out positive; an unseen replacement for "So the answer is"
negative); both print every selection option (score variants, base-NLL floor, three-way split) on the same scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m",
                    help="base model: alias, HF folder, or 'tiny' (random 2-layer Llama, tokenizer trained on the files)")
    ap.add_argument("--files", nargs="+", default=[str(REPO / "examples/data/flan_v2_cot/*.tsv")])
    ap.add_argument("--n-reference", type=int, default=160, help="clean samples for the reference model")
    ap.add_argument("--n-train", type=int, default=240, help="training samples (a fraction of them corrupted)")
    ap.add_argument("--fraction", type=float, default=0.25, help="share of training samples corrupted")
    ap.add_argument("--modes", nargs="*", default=["swap", "shuffle_words", "shuffle_chars"],
                    help="corruption modes of the noise check (none: only the positive controls, with --controls)")
    ap.add_argument("--rho", type=float, default=0.7)
    ap.add_argument("--ref-steps", type=int, default=20, help="reference optimizer steps")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--full", action="store_true", help="train all weights instead of a LoRA (r=16)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", default="/tmp/forgetting-ray-bench-noise")
    ap.add_argument("--json", default=None, help="also write the raw record (every figure of the tables) to this file")
    ap.add_argument("--tables", default=None, metavar="RAW_JSON",
                    help="run nothing: print the Markdown tables of a raw record that --json wrote")
    ap.add_argument("--controls", action="store_true", help="also run the positive controls")
    args = ap.parse_args()
    if args.tables:
        from forgetting_ray.studies.tables import render

        print(render(json.loads(Path(args.tables).read_text(encoding="utf-8"))), end="")
        return
    if not args.modes and not args.controls:
        ap.error("nothing to run: give --modes, --controls or both")
    for k, v in (("HF_HUB_OFFLINE", "1"), ("DS_ACCELERATOR", "cpu"), ("TOKENIZERS_PARALLELISM", "false"),
                 ("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))):
        os.environ.setdefault(k, v)
    logging.basicConfig(level=logging.WARNING)

    from forgetting_ray.config import PipelineConfig
    from forgetting_ray.data.readers import read_records, resolve_files
    from forgetting_ray.studies.corruption import split_reference
    from forgetting_ray.studies.experiments import run_noise_recovery, run_positive_controls
    from forgetting_ray.store import atomic_write_text
    from forgetting_ray.studies.tables import control_record, noise_record, render

    files = resolve_files(args.files)
    model = args.model
    if model == "tiny":
        from forgetting_ray.tiny import build_demo_model, corpus_lines

        model = str(build_demo_model(Path(args.run_dir) / "tiny_model", corpus_lines(files)))
    ft = {"max_steps": args.ref_steps, "micro_batch_size": args.micro_batch, "grad_accum": args.grad_accum,
          "lr": args.lr, "warmup_ratio": 0.05, "deepspeed": {"enabled": False}, "export_dtype": "float32",
          "lora": {"enabled": not args.full, "r": 16, "alpha": 16}, "report_every": 100}
    cfg = PipelineConfig.model_validate({
        "run_dir": args.run_dir,
        "model": {"name_or_path": model},
        "data": {"train_files": [str(f) for f in files], "max_length": args.max_length},
        "reference": ft,
        "selection": {"rho": args.rho},
        "scoring": {"concurrency": 2, "num_cpus_per_actor": 0.5, "batch_tokens": 4096, "shard_size": 128},
        "resources": {"num_workers": 1, "cpus_per_worker": 2},
        "tracking": {"enabled": False},
    })
    records = list(read_records(files, cfg.data))
    reference, train = split_reference(records, args.n_reference, args.n_train, args.seed)
    print(f"model {args.model}: {len(reference)} clean reference samples, {len(train)} training samples, "
          f"{args.fraction:.0%} corrupted per mode; reference {args.ref_steps} steps x "
          f"{args.micro_batch * args.grad_accum} sequences, lr {args.lr}, {'full' if args.full else 'LoRA r=16'}")
    runs = []
    t0 = time.perf_counter()
    for mode in args.modes:
        run = run_noise_recovery(cfg, reference, train, mode=mode, fraction=args.fraction, seed=args.seed)
        runs.append(noise_record(run, args.rho))
        print(f"{mode}: " + ", ".join(f"{k} {v:.0f}s" for k, v in run.seconds.items()) + f"; keys {run.keys}",
              flush=True)
    controls = None
    if args.controls:
        run = run_positive_controls(cfg, reference, train, fraction=args.fraction, seed=args.seed)
        controls = control_record(run)
        print("controls: " + ", ".join(f"{k} {v:.0f}s" for k, v in run.seconds.items()), flush=True)
    raw = {"command": " ".join(["python", "bench/bench_noise_recovery.py", *sys.argv[1:]]),
           "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - t0, 1),
           "args": {k: v for k, v in vars(args).items() if k not in ("json", "tables", "run_dir")},
           "noise": runs, "controls": controls}
    # Every table is rendered from this record, here and by --tables from the committed file.
    if args.json:
        atomic_write_text(args.json, json.dumps(raw, indent=1) + "\n")
    print()
    print(render(json.loads(json.dumps(raw))), end="")
    print(f"\ntotal {raw['seconds']:.0f}s")


if __name__ == "__main__":
    main()
