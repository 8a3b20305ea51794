"""Export under a real DeepSpeed ZeRO-3 run: 2 Ray Train workers, a tiny Llama with LoRA (then ZeRO-2, full).

Every rank holds half of every weight, so an export that forgets to gather writes [0]-shaped or
untrained tensors (STACK_NOTES Exp 2).  The workers train a few steps with the forgetting loss,
record the live model's logits and the gathered LoRA weights, and call ``export_model``; the
driver then checks the export against those records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forgetting_ray import exports

from . import _export_zero3_worker as worker


def _verified_manifest(out: Path) -> dict:
    """The manifest, after checking it lists every file of the export with its current sha256."""
    manifest = exports.read_manifest(out)
    assert exports.file_hashes(out) == manifest["files"]
    return manifest


def _reload(out: Path, prefer: str = exports.MERGED) -> torch.nn.Module:
    """The export as the product loads it: eval's merged model, or the score actors' base + adapter (float32)."""
    from peft import PeftModel

    from forgetting_ray.models import load_model

    source = exports.resolve(out, prefer=prefer)
    if source.mode == exports.ADAPTER:
        base = load_model(exports.read_manifest(out)["base_model_path"], dtype="float32")
        return PeftModel.from_pretrained(base, source.path, is_trainable=False).eval()
    return load_model(source.path, dtype="float32").eval()


@pytest.mark.integration
def test_zero3_lora_export_in_ray_train(ray_cluster, tiny_llama, tmp_path):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from forgetting_ray.train import export as ex

    ray.cloudpickle.register_pickle_by_value(worker)  # workers cannot import the tests package
    cfg = {
        "base": str(tiny_llama),
        "out": str(tmp_path / "export"),
        "out_zero2": str(tmp_path / "export_zero2"),
        "records": str(tmp_path / "records.safetensors"),
        "show_trap": True,
        "trap_dir": str(tmp_path / "trap"),
        "trap_result": str(tmp_path / "trap.json"),
    }
    trainer = TorchTrainer(
        worker.train_and_export,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="export_zero3", storage_path=str(tmp_path / "ray")),
    )
    result = trainer.fit()
    assert result.error is None

    out = Path(cfg["out"])
    records = load_file(cfg["records"])
    manifest = _verified_manifest(out)
    assert manifest["source"] == {"engine": "deepspeed", "zero_stage": 3, "world_size": 2, "zero3_gathered": True}
    assert manifest["model"]["trainable_params"] > 0

    # the trap is real in this setup, and check_tensors names it
    trap = json.loads(Path(cfg["trap_result"]).read_text())
    assert trap["error"] and "empty tensor" in trap["error"]

    # adapter: every LoRA tensor full-sized, lora_B trained, equal to the gathered weights
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_live = {k: v for k, v in records.items() if "lora_" in k}
    assert len(adapter) == len(lora_live) > 0
    for k, t in lora_live.items():
        saved = adapter[k.replace(".default", "")]
        assert saved.shape == t.shape and saved.numel() > 0
        assert torch.equal(saved, t), k
        if "lora_B" in k:
            assert saved.abs().sum() > 0, f"{k} untrained"

    # merged and base+adapter reproduce the trained (sharded) model's logits
    probe, trained = records["probe"], records["logits"]
    for prefer in (exports.MERGED, exports.ADAPTER):
        model = _reload(out, prefer=prefer)
        diff = (ex.model_logits(model, probe, torch.device("cpu")) - trained).abs().max()
        assert diff <= 1e-4, (prefer, float(diff))
    assert manifest["validation"]["merged"]["max_abs_diff"] <= 1e-4
    assert manifest["validation"]["training_effect_max_abs_diff"] > 1e-3  # training moved the logits

    # the same workers' second engine: ZeRO-2, full fine-tune
    out2 = Path(cfg["out_zero2"])
    manifest2 = _verified_manifest(out2)
    assert manifest2["source"] == {"engine": "deepspeed", "zero_stage": 2, "world_size": 2, "zero3_gathered": False}
    assert manifest2["lora"] is False and not (out2 / "adapter").exists()
    diff = (ex.model_logits(_reload(out2), probe, torch.device("cpu")) - records["zero2_logits"]).abs().max()
    assert diff <= 1e-4
    base = load_file(Path(cfg["base"]) / "model.safetensors")
    merged2 = load_file(out2 / "merged" / "model.safetensors")
    assert set(base) == set(merged2) and not torch.equal(base["lm_head.weight"], merged2["lm_head.weight"])
