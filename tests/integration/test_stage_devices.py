"""Every stage that loads a model loads it as configured (attention implementation, dtype), and one that was
configured for GPUs never quietly computes on the CPU: in a process without a CUDA device it stops, naming the
setting, unless resources.cpu_stands_in_for_gpu rehearses the GPU configuration on the CPU."""

from __future__ import annotations

import pytest
import torch

from forgetting_ray.config import EvalConfig, ModelConfig
from forgetting_ray.models import NoGPUVisible, stage_device
from forgetting_ray.stages.evaluate import build_engine
from forgetting_ray.stages.score import ScoreActor


def score_actor(model_dir, *, use_gpu=False, cpu_stands_in=False, attn="eager", dtype="bfloat16"):
    base = ModelConfig(name_or_path=str(model_dir), attn_implementation=attn)
    return ScoreActor(base_cfg=base, ref={"mode": "full", "path": str(model_dir)}, dtype=dtype, use_gpu=use_gpu,
                      threads=1, batch_tokens=512, pad_tolerance=None, chunk_size=None, pad_token_id=0,
                      cpu_stands_in=cpu_stands_in)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_scoring_and_eval_load_the_configured_attention_and_dtype(ray_cluster, tiny_llama, attn):
    actor = score_actor(tiny_llama, attn=attn)
    for model in (actor.base, actor.ref):
        assert model.config._attn_implementation == attn and model.dtype == torch.bfloat16 and not model.training
    engine = build_engine(ModelConfig(name_or_path=str(tiny_llama), attn_implementation=attn, dtype="bfloat16"),
                          EvalConfig())
    assert engine.lm.config._attn_implementation == attn and engine.lm.dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_a_stage_configured_for_gpus_without_one_stops_naming_the_setting(ray_cluster, tiny_llama):
    with pytest.raises(NoGPUVisible, match=r"scoring\.num_gpus_per_actor asks for GPUs .* sees no CUDA device"):
        score_actor(tiny_llama, use_gpu=True)
    with pytest.raises(NoGPUVisible, match=r"eval\.num_gpus_per_actor"):
        build_engine(ModelConfig(name_or_path=str(tiny_llama)), EvalConfig(num_gpus_per_actor=1))
    with pytest.raises(NoGPUVisible, match=r"resources\.use_gpu .*cpu_stands_in_for_gpu"):
        stage_device(True, "resources.use_gpu")
    # the explicit rehearsal: the GPU configuration's code path, on the CPU
    assert score_actor(tiny_llama, use_gpu=True, cpu_stands_in=True).device.type == "cpu"
    assert stage_device(True, "resources.use_gpu", cpu_stands_in=True).type == "cpu"
