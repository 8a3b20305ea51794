"""`bench/gpu_check.py --cpu-rehearsal`: the GPU check's own code path (Ray Train + DeepSpeed ZeRO-3 workers and
Ray Data scoring actors that each hold a GPU slot, LoRA and full fine-tunes, the exports) on a tiny shape, with
the CPU standing in for the one GPU the rehearsal's Ray cluster declares.  What it cannot check here is the
GPU's speed: MFU needs a GPU's peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST_TRAIN_POLL

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_rehearses_the_gpu_configuration_on_the_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | FAST_TRAIN_POLL  # its own cluster, with a GPU slot
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_check.py"), "--cpu-rehearsal", "--steps", "4",
                           "--samples", "120", "--run-dir", str(tmp_path / "run"), "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    f = json.loads(out.read_text())
    assert f["gpus"] == 1 and f["config"]["resources"]["use_gpu"] and f["config"]["scoring"]["num_gpus_per_actor"] == 1
    assert set(f["stage_seconds"]) == {"prepare", "reference (LoRA SFT)", "score", "partition", "train (LoRA)",
                                       "train (full)"}
    assert f["score_tokens_per_s"] > 0
    lora, full = f["fine_tunes"]
    for t in (lora, full):
        assert t["steps"] == 4 and t["tokens_per_s"] > 0 and t["plan_gpu_gib"] > 0
        assert t["mfu"]["6N"] is None  # no GPU peak on a CPU
        assert list(Path(t["export"]).rglob("*.safetensors"))
    assert lora["export"] != full["export"]
    assert "tokens/s" in proc.stdout and "MFU n/a" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_gpu_check_without_gpu_says_so(ray_cluster):
    # attaches to the session's cluster (no GPU) rather than starting one of its own
    env = os.environ | {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 2
    assert "the Ray cluster has no GPUs" in run.stderr and "--cpu-rehearsal" in run.stderr
