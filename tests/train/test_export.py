"""Export of trained models (no Ray): plain, DDP-wrapped and LoRA models, dtypes, validation failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from forgetting_ray import exports
from forgetting_ray.exports import ADAPTER, MANIFEST, MERGED
from forgetting_ray.models import load_model
from forgetting_ray.store import file_sha256
from forgetting_ray.train import export as ex

TRAIN_CONFIG = {"strategy": "forgetting", "lr": 1e-4, "lora": {"r": 4}}


def _load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)


def _train(model: torch.nn.Module, steps: int = 2, lr: float = 1e-2) -> torch.nn.Module:
    """A couple of real optimizer steps so every trainable tensor (lora_B included) moves off its init."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    vocab = model.config.get_text_config().vocab_size
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (2, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def _lora(model: torch.nn.Module, r: int = 4) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def _export(model, base: Path, out: Path, *, lora: bool, dtype: str = "float32") -> Path:
    tok = AutoTokenizer.from_pretrained(base)
    return ex.export_model(model, tok, out, lora=lora, dtype=dtype, base_model_path=str(base), train_config=TRAIN_CONFIG)


def _logits(model, ids):
    return ex.model_logits(model, ids, torch.device("cpu"))


def _reload(out: Path, prefer: str = MERGED) -> torch.nn.Module:
    """An export as the product loads it: what ``exports.resolve`` names, loaded like eval does (merged) or like
    the score actors do (the base named in the manifest + the adapter), in float32."""
    from peft import PeftModel

    source = exports.resolve(out, prefer=prefer)
    if source.mode == ADAPTER:
        base = load_model(exports.read_manifest(out)["base_model_path"], dtype="float32")
        return PeftModel.from_pretrained(base, source.path, is_trainable=False).eval()
    return load_model(source.path, dtype="float32").eval()


def _changed_since_export(out: Path) -> list[str]:
    """Files changed, missing or added since the manifest was written."""
    listed, now = exports.read_manifest(out)["files"], exports.file_hashes(out)
    return sorted(rel for rel in set(listed) | set(now) if listed.get(rel) != now.get(rel))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_manifest_matches(out: Path) -> dict:
    manifest = exports.read_manifest(out)
    on_disk = {str(f.relative_to(out)) for f in out.rglob("*") if f.is_file() and f.name != MANIFEST}
    assert set(manifest["files"]) == on_disk
    for rel, digest in manifest["files"].items():
        assert file_sha256(out / rel) == digest, rel
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")), "weights must be safetensors only"
    return manifest


def test_export_plain_model(tiny_llama, tmp_path):
    model = _train(_load(tiny_llama))
    ids = ex.probe_inputs(model.config.vocab_size, seed=7)
    trained = _logits(model, ids)

    out = _export(model, tiny_llama, tmp_path / "export", lora=False)

    assert out == tmp_path / "export"
    assert not (out / "adapter").exists()
    merged = out / "merged"
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    manifest = _assert_manifest_matches(out)
    assert manifest["dtype"] == "float32" and manifest["lora"] is False
    assert manifest["base_model_path"] == str(tiny_llama) and manifest["train_config"] == TRAIN_CONFIG
    assert manifest["source"]["engine"] == "plain"
    from forgetting_ray.models import tokenizer_fingerprint

    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_llama))
    v = manifest["validation"]["merged"]
    assert v["passed"] and v["max_abs_diff"] <= 1e-4
    # the export holds the trained weights, not the base ones
    saved = _tensors(merged)
    live = model.state_dict()
    assert set(saved) == set(live)
    for k, t in saved.items():
        assert torch.equal(t, live[k]), k
    reloaded = _reload(out)
    assert torch.allclose(_logits(reloaded, ids), trained, atol=1e-5)
    assert list(tmp_path.iterdir()) == [out], "no temporary folders left behind"


def test_export_lora_tied_embeddings_bf16(tiny_models, tmp_path):
    base = tiny_models["qwen2"]  # tied embeddings, zero-initialised q/k/v biases
    model = _train(_lora(_load(base)))
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b.values())
    ids = ex.probe_inputs(model.config.vocab_size, seed=7)
    trained = _logits(model, ids)

    out = _export(model, base, tmp_path / "export", lora=True, dtype="bfloat16")

    manifest = _assert_manifest_matches(out)
    assert manifest["lora"] is True and manifest["dtype"] == "bfloat16"
    assert manifest["model"]["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    val = manifest["validation"]
    for route in ("merged", "adapter"):
        assert val[route]["passed"] and 0 < val[route]["max_abs_diff"] <= val[route]["limit"], route
    assert val["training_effect_max_abs_diff"] > val["merged"]["max_abs_diff"]
    assert any(k.endswith("q_proj.bias") for k in val["tensors"]["merged"]["zero_tensors_allowed"])

    # adapter: PEFT safetensors with every trained lora_B, in the export dtype
    adapter = out / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base) and cfg["r"] == 4
    saved = load_file(adapter / "adapter_model.safetensors")
    assert {k for k in saved if "lora_B" in k} == {k.replace(".default", "") for k in lora_b}
    for k, t in lora_b.items():
        s = saved[k.replace(".default", "")]
        assert s.dtype == torch.bfloat16 and s.shape == t.shape and s.abs().sum() > 0
        assert torch.allclose(s.float(), t, atol=1e-2, rtol=1e-2)

    # merged: plain HF folder in bf16, embeddings still tied, no peft leftovers
    merged = out / "merged"
    with safe_open(str(next(merged.glob("*.safetensors"))), framework="pt") as st:
        keys = list(st.keys())
        assert all(st.get_tensor(k).dtype == torch.bfloat16 for k in keys)
    assert not any("lora" in k or "base_layer" in k for k in keys)
    assert "lm_head.weight" not in keys  # tied: stored once
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    m = _reload(out)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.config.vocab_size == model.config.vocab_size  # no embedding resizing
    torch.testing.assert_close(_logits(m, ids), trained, atol=val["merged"]["limit"], rtol=0)
    a = _reload(out, prefer=ADAPTER)
    from peft import PeftModel

    assert isinstance(a, PeftModel)
    torch.testing.assert_close(_logits(a, ids), trained, atol=val["adapter"]["limit"], rtol=0)


def test_export_lora_fp32_matches_tightly(tiny_llama, tmp_path):
    model = _train(_lora(_load(tiny_llama)))
    out = _export(model, tiny_llama, tmp_path / "export", lora=True, dtype="float32")
    val = exports.read_manifest(out)["validation"]
    assert val["merged"]["max_abs_diff"] <= 1e-4 and val["adapter"]["max_abs_diff"] <= 1e-4
    # the merge really changed the weights: merged differs from base where LoRA was applied
    base = _tensors(tiny_llama)
    merged = _tensors(out / "merged")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(base[q], merged[q])
    assert torch.equal(base["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])  # frozen


def test_export_ddp_wrapped(tiny_llama, tmp_path):
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = _train(_load(tiny_llama), steps=1)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        out = _export(ddp, tiny_llama, tmp_path / "export", lora=False)
    finally:
        dist.destroy_process_group()
    manifest = _assert_manifest_matches(out)
    assert manifest["source"] == {"engine": "ddp", "world_size": 1, "zero3_gathered": False}
    assert manifest["validation"]["merged"]["max_abs_diff"] <= 1e-4


def test_find_causal_lm_walks_wrappers(tiny_llama):
    model = _lora(_load(tiny_llama))

    class Wrapper(torch.nn.Module):  # like the train loop's TokenNLL inside a DeepSpeed engine
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert ex.find_causal_lm(Wrapper(Wrapper(model))) is model
    with pytest.raises(TypeError, match="no Hugging Face or PEFT model"):
        ex.find_causal_lm(torch.nn.Linear(2, 2))


def test_all_zero_tensor_is_caught_and_nothing_written(tiny_llama, tmp_path):
    model = _train(_load(tiny_llama), steps=1)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()
    named = r"all-zero tensor merged/model.safetensors:model\.layers\.1\.mlp\.down_proj\.weight"
    with pytest.raises(ex.ExportValidationError, match=named):
        _export(model, tiny_llama, tmp_path / "export", lora=False)
    assert list(tmp_path.iterdir()) == [], "a failed export leaves nothing behind"


def test_untrained_lora_is_caught(tiny_llama, tmp_path):
    model = _lora(_load(tiny_llama))  # lora_B is zero at init: what a ZeRO-3 save without gathering looks like
    with pytest.raises(ex.ExportValidationError, match=r"all-zero tensor adapter/.*lora_B.*LoRA never updated"):
        _export(model, tiny_llama, tmp_path / "export", lora=True)
    assert not (tmp_path / "export").exists()


def test_lora_flag_must_match_model(tiny_llama, tmp_path):
    with pytest.raises(exports.ExportError, match="lora=True but the model is not a PEFT model"):
        _export(_load(tiny_llama), tiny_llama, tmp_path / "e", lora=True)
    with pytest.raises(ValueError, match="export dtype"):
        ex.export_model(_load(tiny_llama), None, tmp_path / "e", lora=False, dtype="int8",
                        base_model_path=str(tiny_llama), train_config={})


def test_logits_mismatch_and_tampering_are_caught(tiny_llama, tmp_path):
    model = _train(_lora(_load(tiny_llama)))
    out = _export(model, tiny_llama, tmp_path / "export", lora=True)
    ids = ex.probe_inputs(model.config.vocab_size)
    trained = _logits(model, ids)
    ex.validate_export(out, trained, ids, dtype="float32", base_model_path=str(tiny_llama))  # passes as written

    # a reference from another model (the base) is a mismatch on both routes
    with pytest.raises(ex.ExportValidationError, match=r"merged: logits .* differ .* max \|diff\|"):
        ex.validate_export(out, _logits(_load(tiny_llama), ids), ids, dtype="float32", base_model_path=str(tiny_llama))

    # perturb one merged weight on disk: validation and the manifest hashes both notice
    f = out / "merged" / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.mlp.up_proj.weight"] += 0.5
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ex.ExportValidationError, match="merged: logits"):
        ex.validate_export(out, trained, ids, dtype="float32", base_model_path=str(tiny_llama))
    assert _changed_since_export(out) == ["merged/model.safetensors"]
    (tmp_path / "export2").mkdir()
    out2 = _export(model, tiny_llama, tmp_path / "export2", lora=True)  # overwrites an existing folder
    assert _changed_since_export(out2) == []
    (out2 / "merged" / "extra.safetensors").write_bytes(b"")
    assert _changed_since_export(out2) == ["merged/extra.safetensors"]


def test_resolve_falls_back_to_merged_and_rejects_non_exports(tiny_llama, tmp_path):
    model = _train(_load(tiny_llama), steps=1)
    out = _export(model, tiny_llama, tmp_path / "export", lora=False)
    source = exports.resolve(out, prefer=ADAPTER)  # no adapter/: the merged model
    assert (source.mode, source.path, source.export_dir) == (MERGED, str(out / MERGED), str(out))
    m = _reload(out, prefer=ADAPTER)
    assert m.dtype == torch.float32 and not hasattr(m, "peft_config")
    with pytest.raises(exports.ExportError, match="manifest.json is missing"):
        exports.read_manifest(tiny_llama)


@pytest.mark.parametrize("arch", ["gpt_neo", "gemma3"])
def test_export_other_architectures_lora(tiny_models, tmp_path, arch):
    """GPT-Neo (tied head, biases, attention-mask buffers) and Gemma3 (zero-initialised norm offsets,
    logit soft-capping): buffers survive the rebuild and weights zero in the base checkpoint are allowed."""
    base = tiny_models[arch]
    model = _train(_lora(_load(base)))
    ids = ex.probe_inputs(model.config.vocab_size, seed=3)
    trained = _logits(model, ids)
    out = _export(model, base, tmp_path / "export", lora=True)
    manifest = _assert_manifest_matches(out)
    assert manifest["validation"]["merged"]["max_abs_diff"] <= 1e-4
    torch.testing.assert_close(_logits(_reload(out), ids), trained, atol=1e-4, rtol=0)
