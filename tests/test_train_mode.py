"""The training engine trains: the model is in training mode, so dropout is active and transformers' activation
checkpointing really recomputes the decoder layers in the backward pass; the configured attention
implementation and compute dtype reach it.  In-process (no Ray): the DDP runner on one CPU worker."""

from __future__ import annotations

import pytest
import torch

from forgetting_ray.config import TrainingConfig
from forgetting_ray.errors import UserError
from forgetting_ray.train.deepspeed_setup import create_runner, training_precision


def runner_for(model_dir, **training):
    ft = TrainingConfig.model_validate({"deepspeed": {"enabled": False}, "lora": {"enabled": False}, **training})
    return create_runner(str(model_dir), ft, world_size=1, total_steps=4, device=torch.device("cpu"),
                         chunk_size=None, attn_implementation=training.pop("_attn", None))


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (2, 24), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def layer_forwards(runner, b) -> int:
    """How many times the decoder layers' attention runs in one forward and backward (transformers checkpoints a
    layer's ``forward``, leaving the layer's own hooks outside: a module inside it is what runs again; torch's
    recompute stops early, once it has what the backward needs, so the MLP may not run again)."""
    calls = []
    attention = [m for name, m in runner.model.named_modules() if name.endswith("self_attn")]
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in attention]
    try:
        runner.forward(b).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return len(calls)


def test_the_model_trains_in_training_mode(tiny_llama):
    runner = runner_for(tiny_llama)
    assert runner.model.training and all(m.training for m in runner.model.modules())


@pytest.mark.parametrize("lora", [False, True])
def test_activation_checkpointing_recomputes_every_decoder_layer_in_the_backward(tiny_llama, lora):
    n_layers = len(runner_for(tiny_llama).model.model.layers)
    adapters = {"enabled": lora, "dropout": 0.0}  # training mode: a dropout would make the gradients differ
    plain = runner_for(tiny_llama, lora=adapters)
    checkpointed = runner_for(tiny_llama, lora=adapters, gradient_checkpointing=True)
    assert layer_forwards(plain, batch()) == n_layers
    assert layer_forwards(checkpointed, batch()) == 2 * n_layers  # each layer again, in the backward
    # the same gradients either way
    for (name, a), (_, b) in zip(plain.model.named_parameters(), checkpointed.model.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_full_fine_tune_trains_with_the_models_dropout(tiny_llama, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_llama)
    config.attention_dropout = 0.5
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    runner = runner_for(tmp_path)
    b = batch()
    with torch.no_grad():
        first, second = runner.forward(b), runner.forward(b)
        runner.model.eval()
        third, fourth = runner.forward(b), runner.forward(b)
    assert not torch.allclose(first, second)  # dropout active while training
    torch.testing.assert_close(third, fourth)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_configured_attention_reaches_the_training_model(tiny_llama, attn):
    ft = TrainingConfig.model_validate({"deepspeed": {"enabled": False}, "lora": {"enabled": False}})
    runner = create_runner(str(tiny_llama), ft, world_size=1, total_steps=2, device=torch.device("cpu"),
                           attn_implementation=attn)
    assert runner.model.config._attn_implementation == attn


def test_training_precision_follows_model_dtype():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert training_precision("auto", cpu) is None and training_precision("float32", gpu) is None
    assert training_precision("auto", gpu) == torch.bfloat16 == training_precision("bfloat16", cpu)
    with pytest.raises(UserError, match="float16 cannot train"):
        training_precision("float16", gpu)
