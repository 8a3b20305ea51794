"""`bench/gpu_check.py --cpu-rehearsal`: the GPU check's own code path (Ray Train + DeepSpeed ZeRO-3 workers and
Ray Data scoring actors that each hold a GPU slot, LoRA and full fine-tunes, the exports) on a tiny shape, with
the CPU standing in for the one GPU the rehearsal's Ray cluster declares, and the arithmetic of its MFU figures
against a stand-in peak.  What it cannot check here is the GPU's speed."""

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
PEAK_TFLOPS = 0.05  # a stand-in peak: the CPU has no tensor-core figure, but the MFU arithmetic runs


def test_gpu_check_rehearses_the_gpu_configuration_on_the_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | FAST_TRAIN_POLL  # its own cluster, with a GPU slot
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_check.py"), "--cpu-rehearsal", "--steps", "4",
                           "--samples", "120", "--run-dir", str(tmp_path / "run"), "--json", str(out),
                           "--peak-tflops", str(PEAK_TFLOPS)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    f = json.loads(out.read_text())
    assert f["gpus"] == 1 and f["config"]["resources"]["use_gpu"] and f["config"]["scoring"]["num_gpus_per_actor"] == 1
    assert set(f["stage_seconds"]) == {"prepare", "reference (LoRA SFT)", "score", "partition", "train (LoRA)",
                                       "train (full)"}
    lora, full = f["fine_tunes"]
    for t in (lora, full):
        assert t["steps"] == 4 and t["tokens_per_s"] > 0 and t["plan_gpu_gib"] > 0
        assert list(Path(t["export"]).rglob("*.safetensors"))
    assert lora["export"] != full["export"]
    # plan's host memory (forgetting_ray.plan, the CPU case) against each process's peak, sampled in it: at this
    # shape it is mostly the runtime allowance, which is calibrated here
    for t in (lora, full):
        for peak in t["peak_rss_gib"]:
            assert peak == pytest.approx(t["plan_host_gib"], rel=0.2), (t["fine_tune"], t["peak_rss_gib"], t["plan_host_gib"])
    assert "tokens/s" in proc.stdout and "MFU " in proc.stdout

    # the MFU arithmetic, by hand on the rehearsal's shape (bench/gpu_check.py REHEARSAL_SHAPE: tied embeddings)
    body, head, lora_params, attn = 74_048, 512 * 64, 2 * 64 * (2 * 128 + 2 * 96 + 3 * 192), 2 * 64
    for t, passes, adapters in ((full, 6, 0), (lora, 4, lora_params)):
        per_token = t["flops_per_token"]
        seq, head_share = t["mean_tokens_per_sequence"], t["head_tokens"] / t["tokens"]
        assert 0 < head_share < 1  # prompts never reach the head
        model = passes * (body + head * head_share) + 6 * adapters + 12 * attn * seq
        assert per_token["model"] == pytest.approx(model, rel=1e-9)
        assert per_token["hardware"] - per_token["model"] == pytest.approx(2 * (body + adapters) + 4 * attn * seq)
        assert t["mfu"]["model"] == pytest.approx(per_token["model"] * t["tokens_per_s"] / (PEAK_TFLOPS * 1e12))
    s = f["scoring"]
    assert s["tokens_per_s"] > 0 and 0 < s["head_tokens"] < s["tokens"]
    assert s["actor_peak_rss_gib"] == pytest.approx(s["plan_host_gib"], rel=0.2), (s["actor_peak_rss_gib"], s["plan_host_gib"])
    score_model = 2 * (2 * body + 2 * head * s["head_tokens"] / s["tokens"] + 4 * attn * s["tokens"] / s["rows"])
    assert s["flops_per_token"]["model"] == pytest.approx(score_model, rel=1e-9)
    assert s["mfu"]["model"] == pytest.approx(score_model * s["tokens_per_s"] / (PEAK_TFLOPS * 1e12))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_gpu_check_without_gpu_says_so(ray_cluster):
    # attaches to the session's cluster (no GPU) rather than starting one of its own
    env = os.environ | {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 2
    assert "the Ray cluster has no GPUs" in run.stderr and "--cpu-rehearsal" in run.stderr
