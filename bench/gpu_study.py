"""The FORGETTING study at a scale two CPU cores cannot reach: the whole shipped corpus on one GPU, in one process.

Written for a lent GPU machine that holds PyTorch, transformers and peft but cannot install Ray or DeepSpeed
(nothing is fetched there, and Ray's wheel alone is larger than what one call may carry). So the stages run here
without Ray: the product's own prepare (canonical tokenization, disjoint reference split), ``token_nll``,
exact top-rho ``selection.partition``, ``forgetting_loss`` with its lambda schedule, ``apply_lora`` and the
native evaluation harness, driven by a plain single-GPU loop (bf16 autocast, fp32 weights, AdamW, linear warmup
and decay). The distributed path of the same stages is what ``bench/gpu_check.py`` measures.

1. prepare: FLAN v2 CoT (all four files) + Dolly, ``--n-reference`` samples split off for the reference;
2. reference: SFT of the base on the reference split (full fine-tune, ``--ref-epochs``), then its mean NLL
   against the base's on that split (seen) and on the training split (held out);
3. score + partition: score = NLL_base - NLL_ref per response token of the training split, global top rho;
4. fine-tunes on the training split, the same seeded order for all: sft, forgetting and ignore, each as a
   full and as a LoRA fine-tune (``--base-nll-floor``: FORGETTING once more with that selection option);
5. evaluation: the five benchmarks on the same seeded documents for every model; paired bootstrap intervals.

Every figure goes to ``--out`` (results.json, report.md) as soon as it exists, so a run cut short by its
time limit still reports what it finished; with ``--deadline-s`` no fine-tune starts that would end after that
many seconds if it took as long (with its evaluation) as the one before. results.json is the run's raw record:
besides the figures it keeps every model's per-document benchmark values, and report.md is rendered from it
alone, so ``--tables results.json`` writes the same report again on any machine without a GPU.

    python bench/gpu_study.py --model /path/to/SmolLM2-135M --out /tmp/gpu-study     # on the GPU machine
    python bench/gpu_study.py --model tiny --cpu-rehearsal --files examples/data/dolly/dolly.jsonl \
        --n-reference 50 --micro-batch 8 --eval-limit 4 --out /tmp/rehearsal           # a minute on a CPU
    python bench/gpu_study.py --tables /tmp/gpu-study/results.json --out /tmp/again   # report.md from the record
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CORPUS = [str(REPO / "examples/data/flan_v2_cot_full/*.tsv"), str(REPO / "examples/data/dolly/dolly.jsonl")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="base model: alias, HF folder, or 'tiny'")
    p.add_argument("--files", nargs="+", default=CORPUS, help="training corpus (default: all shipped data)")
    p.add_argument("--n-reference", type=int, default=4000, help="samples split off for the reference")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--rho", type=float, default=0.7)
    p.add_argument("--ref-epochs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1, help="passes of every fine-tune over the training split")
    p.add_argument("--micro-batch", type=int, default=32, help="sequences per optimizer step")
    p.add_argument("--ref-lr", type=float, default=5e-5, help="learning rate of the reference (full fine-tune)")
    p.add_argument("--lr-full", type=float, default=2e-5, help="learning rate of the full fine-tunes")
    p.add_argument("--lr-lora", type=float, default=1e-4, help="learning rate of the LoRA fine-tunes (the paper's)")
    p.add_argument("--lora-r", type=int, default=64, help="LoRA rank (the paper's 64, alpha 16)")
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--strategies", nargs="+", default=["sft", "forgetting", "ignore"],
                   help="in the order they run (a deadline cuts the last ones)")
    p.add_argument("--base-nll-floor", type=float, default=None,
                   help="also train FORGETTING with selection.base_nll_floor (negatives the base predicts "
                        "better than this are ignored), named forgetting_floor")
    p.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-limit", type=float, default=300, help="documents per benchmark (seeded sample)")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no fine-tune that would end after this many seconds (judged by the one before)")
    p.add_argument("--cpu-rehearsal", action="store_true", help="run on the CPU (the code path, not the scale)")
    p.add_argument("--n-boot", type=int, default=10_000)
    p.add_argument("--out", required=True, help="folder for results.json and report.md")
    p.add_argument("--tables", default=None, metavar="RESULTS_JSON",
                   help="run nothing: write report.md into --out again from a finished run's results.json")
    p.add_argument("--work", default=None, help="folder for the prepared data, models and evaluations (default --out)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    logging.basicConfig(level=logging.WARNING)
    import torch

    from forgetting_ray.config import PipelineConfig
    from forgetting_ray.data.table import read_token_table
    from forgetting_ray.models import load_model, load_tokenizer
    from forgetting_ray.report.study import read_eval_samples
    from forgetting_ray.scoring import response_token_nlls
    from forgetting_ray.selection import partition, three_way
    from forgetting_ray.stages.evaluate import run_eval
    from forgetting_ray.stages.prepare import run_prepare
    from forgetting_ray.store import atomic_write_text

    out = Path(args.out)
    if args.tables:
        out.mkdir(parents=True, exist_ok=True)
        _write_report(out, json.loads(Path(args.tables).read_text(encoding="utf-8")))
        print(f"wrote {out / 'report.md'}")
        return
    work = Path(args.work) if args.work else out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    device = torch.device("cpu" if args.cpu_rehearsal else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --cpu-rehearsal to run the code path on the CPU")
    results: dict = {"args": vars(args), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "timings_s": {}}

    def save(stage: str) -> None:
        results["timings_s"][stage] = round(time.perf_counter() - t0, 1)
        atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
        print(f"[{time.perf_counter() - t0:7.1f} s] {stage}", flush=True)

    def time_left(needed_s: float = 0.0) -> bool:
        return args.deadline_s is None or time.perf_counter() - t0 + needed_s < args.deadline_s

    model_path = args.model
    if model_path == "tiny":
        from forgetting_ray.data.readers import resolve_files
        from forgetting_ray.tiny import build_demo_model, corpus_lines

        model_path = str(build_demo_model(work / "tiny_model", corpus_lines(resolve_files(args.files[:1]))))
    cfg = PipelineConfig.model_validate({
        "run_dir": str(work / "run"),
        "model": {"name_or_path": model_path},
        "data": {"train_files": args.files, "max_length": args.max_length, "reference_count": args.n_reference,
                 "column_map": {"answer": "completion"}},
        "eval": {"limit": args.eval_limit, "limit_mode": "random", "seed": 1234, "backend": "local",
                 "batch_size": args.eval_batch, "num_gpus_per_actor": 1},
        "resources": {"cpu_stands_in_for_gpu": args.cpu_rehearsal},
        "tracking": {"enabled": False},
    })

    # 1. prepare
    prepared = run_prepare(cfg)
    train_rows = read_token_table(prepared.train_path).to_pylist()
    ref_rows = read_token_table(prepared.reference_path).to_pylist()
    tok = load_tokenizer(cfg.model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    results["data"] = {"train_samples": len(train_rows), "reference_samples": len(ref_rows),
                       "train_response_tokens": int(sum(np.sum(np.asarray(r["labels"]) != -100) for r in train_rows)),
                       "reference_response_tokens": int(sum(np.sum(np.asarray(r["labels"]) != -100) for r in ref_rows))}
    save("prepare")

    def fresh_model():
        return load_model(cfg.model, device=device, dtype="float32")

    # 2. reference: full SFT on the reference split; its fit on that split and on the training split
    base = fresh_model()
    reference = fresh_model()
    ref_curve = finetune(reference, ref_rows, strategy="sft", epochs=args.ref_epochs, lr=args.ref_lr,
                         micro_batch=args.micro_batch, seed=args.seed, pad=pad, device=device)
    nll = {}
    for split, rows in (("reference split (seen)", ref_rows), ("training split (held out)", train_rows)):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            nll[split] = {"base": response_token_nlls(base, rows, pad, batch_size=64),
                          "reference": response_token_nlls(reference, rows, pad, batch_size=64)}
    results["reference"] = {"curve": ref_curve, "fit": {
        split: {"base": float(np.mean(np.concatenate(v["base"]))), "reference": float(np.mean(np.concatenate(v["reference"]))),
                "tokens": int(sum(len(x) for x in v["base"]))} for split, v in nll.items()}}
    for f in results["reference"]["fit"].values():
        f["gain_relative"] = (f["base"] - f["reference"]) / f["base"]
    save("reference")

    # 3. score and partition: per response token of the training split, exact global top rho
    held = nll["training split (held out)"]
    nll_base, nll_ref = np.concatenate(held["base"]), np.concatenate(held["reference"])
    scores = nll_base - nll_ref
    classes = partition(scores, args.rho)
    neg, pos = classes < 0, classes > 0
    q = (0.1, 0.5, 0.9)
    threshold = float(scores[pos].min())
    results["partition"] = {
        "tokens": int(scores.size), "threshold": threshold, "negative_share": float(neg.mean()),
        "score_quantiles": np.quantile(scores, (0.01, 0.1, 0.5, 0.9, 0.99)).round(4).tolist(),
        "base_nll_quantiles": {"negative": np.quantile(nll_base[neg], q).round(3).tolist(),
                               "positive": np.quantile(nll_base[pos], q).round(3).tolist()},
    }
    runs = [(strategy, strategy, _split_back(classes, train_rows)) for strategy in args.strategies]
    if args.base_nll_floor is not None:
        floored = three_way(classes, scores, negative_at_most=None, nll_base=nll_base,
                            base_nll_floor=args.base_nll_floor)
        results["partition"]["floor"] = {"base_nll_floor": args.base_nll_floor,
                                         "negative_share": float((floored < 0).mean()),
                                         "ignored_share": float((floored == 0).mean())}
        runs.append(("forgetting_floor", "forgetting", _split_back(floored, train_rows)))
    del reference
    save("partition")

    # 4-5. fine-tunes and evaluations, the most informative first: base, then full, then LoRA

    def evaluate(name: str, model) -> None:
        folder = work / "models" / name
        unwrapped = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        unwrapped.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        res = run_eval(cfg, str(folder), work / "eval" / name)
        samples = read_eval_samples(res.out_dir, cfg.eval.tasks)
        results.setdefault("eval", {})[name] = {"headline": res.headline, "average": res.average}
        results.setdefault("samples", {})[name] = {task: x.to_raw() for task, x in samples.items()}
        save(f"eval {name}")  # the record first: the report is rendered from it
        _write_report(out, results)

    evaluate("base", base)
    del base
    results["finetunes"] = {}
    last_cost = 0.0  # seconds the previous fine-tune and its evaluation took: start none that would overrun
    for mode in args.modes:
        for label, strategy, rows in runs:
            name = f"{label}-{mode}"
            if not time_left(last_cost):
                results.setdefault("skipped", []).append(name)
                continue
            started = time.perf_counter()
            model = fresh_model()
            if mode == "lora":
                from forgetting_ray.train.deepspeed_setup import apply_lora

                model = apply_lora(model, cfg.training.model_copy(update={"lora": cfg.training.lora.model_copy(
                    update={"r": args.lora_r, "alpha": args.lora_alpha, "enabled": True})}))
            curve = finetune(model, rows, strategy=strategy, epochs=args.epochs,
                             lr=args.lr_lora if mode == "lora" else args.lr_full, micro_batch=args.micro_batch,
                             seed=args.seed, pad=pad, device=device, t_max=cfg.training.t_max,
                             schedule=cfg.training.lambda_schedule, t_min=cfg.training.t_min)
            results["finetunes"][name] = curve
            save(f"train {name}")
            evaluate(name, model)
            last_cost = time.perf_counter() - started
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    save("done")


def finetune(model, rows, *, strategy: str, epochs: int, lr: float, micro_batch: int, seed: int, pad: int, device,
             t_max: float = 0.0, t_min: float = 0.0, schedule: str = "linear") -> dict:
    """Plain single-device training with the product's loss: one micro-batch per optimizer step, rows in a
    seeded order (the same for every model), bf16 autocast on a GPU. Returns the loss curve's summary."""
    import torch

    from forgetting_ray.data.collate import collate
    from forgetting_ray.losses import forgetting_loss, lambda_schedule
    from forgetting_ray.scoring import token_nll
    from forgetting_ray.train.deepspeed_setup import lr_factor, warmup_steps
    from forgetting_ray.train.loop import prepare_micro_batch

    torch.manual_seed(seed)
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(len(rows)) for e in range(epochs)])
    steps = len(order) // micro_batch
    forgetting = lambda_schedule(schedule, t_max=t_max, t_min=t_min, total_steps=steps)

    def lam(step: int) -> float:  # only FORGETTING has a forgetting term
        return forgetting(step) if strategy == "forgetting" else 0.0

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = warmup_steps(steps, 0.03)
    model.train()
    history = []
    t0 = time.perf_counter()
    tokens = 0
    for step in range(steps):
        picked = [rows[i] for i in order[step * micro_batch:(step + 1) * micro_batch]]
        batch = prepare_micro_batch({k: v.to(device) for k, v in collate(picked, pad).items()}, strategy)
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, warmup=warm, total=steps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            nll = token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        out = forgetting_loss(nll.float(), batch["token_class"], lam(step), strategy=strategy)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tokens += int(batch["attention_mask"].sum())
        history.append((float(out.loss.detach()), float(out.pos_nll), float(out.neg_nll), lam(step)))
    model.eval()
    h = np.asarray(history)
    tenth = max(1, steps // 10)
    return {"steps": steps, "tokens_per_s": tokens / (time.perf_counter() - t0),
            "pos_nll_first_tenth": float(h[:tenth, 1].mean()), "pos_nll_last_tenth": float(h[-tenth:, 1].mean()),
            "neg_nll_first_tenth": float(h[:tenth, 2].mean()), "neg_nll_last_tenth": float(h[-tenth:, 2].mean()),
            "last_lambda": float(h[-1, 3])}


def _split_back(classes: np.ndarray, rows: list[dict]) -> list[dict]:
    """Rows with a ``token_class`` column: each response token's class in place, 0 elsewhere."""
    out, at = [], 0
    for r in rows:
        labels = np.asarray(r["labels"])
        where = np.flatnonzero(labels != -100)
        where = where[where > 0]
        cls = np.zeros(len(labels), dtype=np.int8)
        cls[where] = classes[at:at + len(where)]
        at += len(where)
        out.append({**r, "token_class": cls.tolist()})
    if at != classes.size:
        raise AssertionError(f"{classes.size} classes for {at} response tokens")
    return out


COMPARISONS = [("forgetting", "sft"), ("forgetting", "ignore"), ("ignore", "sft"), ("sft", "base"),
               ("forgetting_floor", "forgetting"), ("forgetting_floor", "sft")]


def render_report(results: dict) -> str:
    """report.md from results.json alone: the data, reference and partition figures, the score table and the
    paired comparisons over the documents (one training seed), bootstrap seeded as in every run."""
    from forgetting_ray.report.study import TaskSamples, comparison_table, compare_models_over_seeds, score_table

    samples = {name: {task: TaskSamples.from_raw(task, x) for task, x in tasks.items()}
               for name, tasks in results.get("samples", {}).items()}
    lines = [f"# GPU study ({results['device']})", "", "```json", json.dumps(
        {k: results[k] for k in ("data", "reference", "partition") if k in results}, indent=1), "```"]
    if samples:
        lines += ["", score_table(samples)]
    pairs = [(f"{a}-{m}", f"{b}-{m}" if b != "base" else b) for m in ("full", "lora") for a, b in COMPARISONS]
    comps = [compare_models_over_seeds([samples], a, b, n_boot=results["args"]["n_boot"])
             for a, b in pairs if a in samples and b in samples]
    if comps:
        lines += ["", comparison_table(comps)]
    return "\n".join(lines) + "\n"


def _write_report(out: Path, results: dict) -> None:
    from forgetting_ray.store import atomic_write_text

    atomic_write_text(out / "report.md", render_report(results))

if __name__ == "__main__":
    main()
