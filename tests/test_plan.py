"""The memory planner, the model presets in jobs/configs/, and bench/gpu_check.py's CPU smoke mode (its refusal on a
cluster without a GPU: tests/integration/test_gpu_check.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from forgetting_ray import plan as P
from forgetting_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
GIB = 2**30

# Published parameter counts (model cards / config-derived) and PEFT's count for Llama-3-8B r=64 all-linear.
KNOWN_PARAMS = {
    "meta-llama/Llama-3.2-1B": 1.236e9,
    "meta-llama/Llama-3.2-3B": 3.213e9,
    "meta-llama/Llama-3.1-8B": 8.030e9,
    "meta-llama/Llama-2-13b-hf": 13.016e9,
    "Qwen/Qwen2.5-0.5B": 0.494e9,
    "Qwen/Qwen2.5-3B": 3.086e9,
    "EleutherAI/gpt-neo-2.7B": 2.651e9,
    "HuggingFaceTB/SmolLM2-135M-Instruct": 134.5e6,
}


@pytest.fixture(scope="module")
def shapes() -> dict[str, P.ModelShape]:
    return {name: P.model_shape(name) for name in P.ARCHITECTURES}


def test_parameter_counts_from_architecture_alone(shapes):
    for name, expected in KNOWN_PARAMS.items():
        assert shapes[name].params == pytest.approx(expected, rel=2e-3), name
    s8 = shapes["meta-llama/Llama-3.1-8B"]
    assert s8.lora_params(64) == 167_772_160
    assert s8.lora_targets == ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
    assert s8.largest_layer_params == 128256 * 4096  # an (untied) embedding or head
    assert shapes["meta-llama/Llama-3.2-1B"].tied_embeddings and not s8.tied_embeddings
    assert shapes["EleutherAI/gpt-neo-2.7B"].attention == "eager"  # no SDPA kernel: the score matrix counts
    assert "lm_head" not in shapes["EleutherAI/gpt-neo-2.7B"].lora_targets


def test_local_folder_counts_match_the_real_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    shape = P.model_shape(tiny_llama)
    assert shape.params == sum(p.numel() for p in model.parameters())
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    assert shape.lora_params(8) == sum(p.numel() for p in peft.parameters() if p.requires_grad)


def test_zero3_per_gpu_memory_falls_with_more_gpus(shapes):
    shape = shapes["meta-llama/Llama-3.1-8B"]
    for lora in (True, False):
        layouts = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (4, 8)]
        states = [P.plan("llama-3.1-8b", n, g, lora=lora, zero_stage=3, offload=False, shape=shape).gpu_model_states_bytes
                  for n, g in layouts]
        assert all(a > b for a, b in zip(states, states[1:])), (lora, states)
    # below ZeRO-3 a LoRA run replicates the frozen base on every GPU: it cannot fall under 2 bytes/param
    z2 = P.plan("llama-3.1-8b", 4, 8, lora=True, zero_stage=2, offload=False, shape=shape)
    assert z2.gpu_model_states_bytes > 2 * shape.params


def test_lora_needs_less_than_full(shapes):
    for name, shape in shapes.items():
        for stage in (0, 1, 2, 3):
            kw = dict(zero_stage=stage, offload="none", shape=shape)
            lo, full = P.plan(name, 1, 4, lora=True, **kw), P.plan(name, 1, 4, lora=False, **kw)
            assert lo.gpu_model_states_bytes < full.gpu_model_states_bytes, (name, stage)
            assert lo.gpu_total_bytes < full.gpu_total_bytes, (name, stage)
            assert lo.trainable_params < full.trainable_params == shape.params
    # With the optimizer offloaded below ZeRO-3, both keep just the 16-bit weights on the GPU, and
    # the LoRA model has the adapter's on top: DeepSpeed's accounting rightly gives LoRA no advantage.
    shape = shapes["meta-llama/Llama-3.2-1B"]
    kw = dict(zero_stage=2, offload="optimizer", shape=shape)
    lo, full = P.plan("llama-3.2-1b", 1, 4, lora=True, **kw), P.plan("llama-3.2-1b", 1, 4, lora=False, **kw)
    assert lo.gpu_model_states_bytes - full.gpu_model_states_bytes == 2 * shape.lora_params(64)
    assert lo.cpu_per_node_bytes < full.cpu_per_node_bytes


def test_offload_moves_memory_to_cpu_and_knobs_move_activations(shapes):
    shape = shapes["meta-llama/Llama-2-13b-hf"]
    kw = dict(lora=False, zero_stage=3, shape=shape)
    none, opt, everything = (P.plan("llama-2-13b", 1, 4, offload=o, **kw) for o in ("none", "optimizer", "all"))
    assert none.gpu_total_bytes > opt.gpu_total_bytes > everything.gpu_total_bytes
    assert none.cpu_per_node_bytes < opt.cpu_per_node_bytes < everything.cpu_per_node_bytes
    assert not none.fits(48) and opt.fits(48)
    ckpt = P.plan("llama-2-13b", 1, 4, offload="none", gradient_checkpointing=True, **kw)
    no_ckpt = P.plan("llama-2-13b", 1, 4, offload="none", gradient_checkpointing=False, **kw)
    assert no_ckpt.gpu_activation_bytes > 5 * ckpt.gpu_activation_bytes
    longer = P.plan("llama-2-13b", 1, 4, offload="none", seq_len=4096, **kw)
    assert longer.gpu_activation_bytes > ckpt.gpu_activation_bytes
    eager = P.plan("llama-2-13b", 1, 4, offload="none", attention="eager", gradient_checkpointing=False, **kw)
    assert eager.gpu_activation_bytes > no_ckpt.gpu_activation_bytes


def test_plan_rejects_bad_settings(tmp_path, capsys):
    with pytest.raises(P.PlanError, match="unknown model 'nope'"):
        P.plan("nope", 1, 1, lora=True, zero_stage=3, offload=False)
    with pytest.raises(P.PlanError, match="parameter offload needs ZeRO-3"):
        P.plan("llama-3.2-1b", 1, 1, lora=True, zero_stage=2, offload="params")
    with pytest.raises(P.PlanError, match="at least one node"):
        P.plan("llama-3.2-1b", 0, 1, lora=True, zero_stage=3, offload=False)
    assert P.main_plan(["nope"]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_presets_load_follow_the_paper_and_fit(path, capsys):
    cfg = load_config(path)
    assert P.lookup_architecture(cfg.model.name_or_path) is not None, "preset model must be in plan.ARCHITECTURES"
    assert "/" in cfg.model.name_or_path  # a hub id, never a local path
    assert cfg.data.max_length == 2048 and cfg.selection.rho == 0.7
    for ft in (cfg.reference, cfg.training):
        assert (ft.lr, ft.warmup_ratio, ft.epochs, ft.micro_batch_size, ft.grad_accum) == (1e-4, 0.03, 1, 2, 3)
        assert (ft.lora.enabled, ft.lora.r, ft.lora.alpha, ft.lora.dropout, ft.lora.target_modules) == (
            True, 64, 16, 0.1, "all-linear")
        assert ft.deepspeed.enabled and ft.deepspeed.zero_stage == 3 and ft.export_dtype == "bfloat16"
        assert ft.weight_decay == 0.0 and not ft.shuffle and ft.max_grad_norm is None
    t = cfg.training
    assert (t.strategy, t.lambda_schedule, t.t_max, t.t_min, t.normalization) == (
        "forgetting", "linear", 0.25, 1e-5, "micro_batch")
    assert cfg.resources.use_gpu and cfg.resources.num_workers == 4  # 2 x 4 x 3 = 24 sequences per step
    assert cfg.scoring.num_gpus_per_actor >= 1 and cfg.eval.num_gpus_per_actor >= 1
    assert cfg.model.trust_remote_code is False

    assert P.model_shape(cfg).params == P.model_shape(cfg.model.name_or_path).params
    assert P.main_plan([str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["zero_stage"] == 3 and result["lora"] and result["gpus_per_node"] == 4
    assert result["gpu_total_bytes"] < 40 * GIB, "the preset fits the 48 GB L40S nodes of cluster.yaml with room"


def test_plan_table_marks_the_chosen_row(capsys):
    assert P.main_plan([str(REPO / "jobs/configs/llama-3.1-8b.yaml"), "--gpu-memory-gib", "48"]) == 0
    out = capsys.readouterr().out
    chosen = [line for line in out.splitlines() if line.startswith("*")]
    assert len(chosen) == 1 and "LoRA r64" in chosen[0] and " 3 " in chosen[0]
    assert "full" in out and "fits 48G" in out


def test_host_memory_of_cpu_training_follows_the_accounting(shapes):
    one_b = shapes["meta-llama/Llama-3.2-1B"]
    kw = dict(lora_r=16, micro_batch_size=1, seq_len=256, gradient_checkpointing=True)
    lora2 = P.host_training_memory(one_b, workers=2, lora=True, zero_stage=3, **kw)
    lora4 = P.host_training_memory(one_b, workers=4, lora=True, zero_stage=3, **kw)
    full2 = P.host_training_memory(one_b, workers=2, lora=False, zero_stage=3, **kw)
    ddp = P.host_training_memory(one_b, workers=2, lora=True, zero_stage=0, deepspeed=False, **kw)
    # fp32 weights partitioned over the ranks at ZeRO-3, whole under DDP
    assert lora2.parts["parameters"] == 4 * one_b.params // 2 and ddp.parts["parameters"] == 4 * one_b.params
    assert lora4.parts["parameters"] == lora2.parts["parameters"] // 2 and "gathered" not in ddp.parts
    # a full fine-tune: 16 bytes of fp32 master, gradient and AdamW moments per weight, over 2 ranks
    assert full2.parts["trained_states"] == 16 * one_b.params // 2
    # ... which is why bench_scale does not run one at 1B on a 24 GiB machine with two workers
    assert 2 * full2.total > 24 * GIB > 2 * lora2.total
    # ... and DeepSpeed's reduce bucket, whole on every rank as far as the gradients fill it, and at the peak the
    # larger of the backward's last flush (two bucket copies, the gathered embedding) and the optimizer step's
    # temporaries (12 bytes per weight of a rank's partition)
    bucket = min(one_b.params, 500_000_000)
    assert full2.parts["reduce_bucket"] == 4 * bucket and "gathered" not in full2.parts
    assert full2.parts["transient"] == max(8 * bucket + 4 * one_b.vocab_size * one_b.hidden_size, 12 * one_b.params // 2)
    small_bucket = P.host_training_memory(one_b, workers=2, lora=False, zero_stage=3, reduce_bucket_size=50_000_000, **kw)
    assert full2.total - small_bucket.total == 4 * (bucket - 50_000_000)  # the optimizer step is the peak at 1B
    # on the CPU the allocator keeps what a LoRA step gathered: the whole model is resident twice at the peak
    assert lora2.parts["gathered"] == 4 * one_b.params and "reduce_bucket" not in lora2.parts
    longer = P.host_training_memory(one_b, workers=2, lora=True, zero_stage=3, **{**kw, "seq_len": 1024})
    assert longer.parts["activations"] > 3 * lora2.parts["activations"]


def test_scoring_actor_holds_one_base_under_an_adapter_reference(shapes):
    one_b = shapes["meta-llama/Llama-3.2-1B"]
    kw = dict(lora_r=16, batch_tokens=2048, max_length=256, chunk_size=None)
    adapter = P.scoring_actor_memory(one_b, adapter_reference=True, **kw)
    merged = P.scoring_actor_memory(one_b, adapter_reference=False, **kw)
    assert adapter.parts["weights"] == 4 * (one_b.params + one_b.lora_params(16))
    assert merged.parts["weights"] == 8 * one_b.params
    # the head's chunk is sized from the vocabulary (constants.CHUNK_BYTES), not from the batch
    from forgetting_ray.constants import CHUNK_BYTES
    assert adapter.parts["head"] <= CHUNK_BYTES


def test_plan_cpu_prints_the_worker_and_the_actor(capsys):
    assert P.main_plan([str(REPO / "bench/configs/scale_1b.yaml"), "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "on CPUs, fp32; LoRA r16, ZeRO-3, 2 workers" in out
    assert "training worker" in out and "scoring actor" in out and "parameters 2.3" in out


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_peak_table():
    mod = _gpu_check_module()
    assert mod.peak_flops("NVIDIA H200") == 989e12
    assert mod.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert mod.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert mod.peak_flops("Tesla T4") is None
