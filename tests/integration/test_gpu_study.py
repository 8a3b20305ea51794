"""`bench/gpu_study.py --cpu-rehearsal`: the single-GPU study's code path (prepare with a reference split, a full
reference fine-tune, token scores, the exact top-rho split, sft and FORGETTING as full and LoRA fine-tunes, the
native evaluation and the paired comparisons) on the tiny model and the shipped Dolly sample, and its report
rendered again from the raw record alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_study_rehearses_on_the_cpu(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_study.py"), "--model", "tiny", "--cpu-rehearsal",
                           "--files", str(REPO / "examples/data/dolly/dolly.jsonl"), "--n-reference", "50",
                           "--micro-batch", "8", "--strategies", "sft", "forgetting", "--base-nll-floor", "6.2",
                           "--eval-limit", "2",
                           "--n-boot", "200", "--out", str(out), "--work", str(work)],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    r = json.loads((out / "results.json").read_text())
    assert r["data"]["reference_samples"] == 50 and r["data"]["train_samples"] > 50
    assert set(r["reference"]["fit"]) == {"reference split (seen)", "training split (held out)"}
    assert r["reference"]["curve"]["steps"] == 12  # 50 rows, 8 per step: 6 steps per epoch, two epochs
    part = r["partition"]
    assert part["tokens"] == r["data"]["train_response_tokens"]  # every response token scored once
    assert abs(part["negative_share"] - 0.3) < 1e-3
    # the floor (near the tiny model's median base NLL) leaves some negatives out, never a positive
    floor = part["floor"]
    assert 0 < floor["ignored_share"] < 0.3 and abs(floor["negative_share"] + floor["ignored_share"] - 0.3) < 1e-3
    models = {f"{s}-{m}" for s in ("sft", "forgetting", "forgetting_floor") for m in ("full", "lora")}
    assert set(r["finetunes"]) == models
    assert r["finetunes"]["forgetting-full"]["last_lambda"] > 0 and r["finetunes"]["sft-full"]["last_lambda"] == 0
    assert set(r["eval"]) == {"base", *models}
    report = (out / "report.md").read_text()
    for row in ("forgetting-full − sft-full", "sft-lora − base", "forgetting_floor-full − forgetting-full"):
        assert f"| {row} |" in report
    assert not list(out.glob("models")) and list((work / "models" / "forgetting-lora").glob("*.safetensors"))
    # results.json is the raw record: every model's per-document values, and the report is rendered from it alone
    assert set(r["samples"]) == set(r["eval"])
    assert len(r["samples"]["sft-full"]["boolq"]["values"]) == 2
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_study.py"), "--tables", str(out / "results.json"),
                           "--out", str(again)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert (again / "report.md").read_text() == report
