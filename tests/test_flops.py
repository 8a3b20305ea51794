"""The FLOP counts behind the MFU figures, checked by hand on a small shape and at Llama-3.2-1B's."""

from __future__ import annotations

import pytest

from forgetting_ray import plan as P
from forgetting_ray.flops import body_matmul_params, finetune_flops, scoring_flops

# Llama, hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 KV heads, vocabulary 512, tied embeddings
SMALL = P.ModelShape(name="small", model_type="llama", params=74_048 + 512 * 64, largest_layer_params=512 * 64,
                     embedding_params=512 * 64, tied_embeddings=True, hidden_size=64, intermediate_size=128,
                     num_layers=2, num_heads=4, kv_size=32, vocab_size=512, gated_mlp=True, attention="sdpa")
BODY = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 5 * 64  # q, o, k, v, gate/up/down; 5 RMSNorm weights
HEAD = 512 * 64


def test_small_shape_by_hand():
    assert body_matmul_params(SMALL) == BODY == 74_048
    tokens, head_tokens, seq = 1000, 300, 100
    attention = 12 * 2 * 64 * seq * tokens
    full = finetune_flops(SMALL, tokens=tokens, head_tokens=head_tokens, seq_len=seq, lora=False, recompute=False)
    assert full.model == full.hardware == 6 * BODY * tokens + 6 * HEAD * head_tokens + attention
    lora = finetune_flops(SMALL, tokens=tokens, head_tokens=head_tokens, seq_len=seq, lora=True, lora_params=1000,
                          recompute=True)
    assert lora.model == 4 * BODY * tokens + 4 * HEAD * head_tokens + 6 * 1000 * tokens + attention
    assert lora.hardware - lora.model == (2 * (BODY + 1000) + 4 * 2 * 64 * seq) * tokens  # the recomputed forward
    score = scoring_flops(SMALL, tokens=tokens, head_tokens=head_tokens, seq_len=seq)
    assert score.model == 2 * (2 * BODY * tokens + 2 * HEAD * head_tokens + 4 * 2 * 64 * seq * tokens)


def test_at_llama_1b_every_token_through_the_head_is_6n_full_and_4n_lora():
    shape = P.model_shape("meta-llama/Llama-3.2-1B")
    n = shape.params  # tied: the head's matmul is the embedding's weights
    full = finetune_flops(shape, tokens=1, head_tokens=1, seq_len=0, lora=False, recompute=False)
    lora = finetune_flops(shape, tokens=1, head_tokens=1, seq_len=0, lora=True, lora_params=0, recompute=True)
    assert full.model == pytest.approx(6 * n, rel=1e-4)
    assert lora.model == pytest.approx(4 * n, rel=1e-4)
    # the head (a quarter of a 1B model's weights) on response tokens only: a third of the tokens here
    partial = finetune_flops(shape, tokens=3, head_tokens=1, seq_len=0, lora=False, recompute=False).model / 3
    assert partial == pytest.approx(6 * (n - 128256 * 2048 * 2 / 3), rel=1e-4)
