"""FLOPs of a fine-tune step and of scoring, for MFU figures that mean MFU.

Counted per token of the transformer body, as in PaLM (appendix B): a matmul with N weights costs 2N
FLOPs per token forward, 2N for the gradient of its input and 2N for the gradient of its weights.

* A full fine-tune pays all three: 6N. LoRA freezes the base, so the base's weight gradients are never
  computed: 4N, plus 6 per adapter weight.
* The output head runs only on the positions that reach it (``scoring.token_nll`` picks the response
  positions before projecting), so it is counted per head token, not per body token.
* Attention's score and value products have no weights: 2 * 2 * layers * hidden * seq per token forward,
  twice that backward (LoRA or not: both inputs of each product need their gradient).
* Activation checkpointing recomputes each layer's forward in the backward pass. That work is not
  *model* FLOPs (the maths needs it once); it is reported apart as *hardware* FLOPs.

The embedding lookup is a gather, not a matmul; tied embeddings still cost the head's matmul.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Flops:
    """FLOPs of some work: ``model`` is what the maths needs, ``hardware`` adds recomputed forwards."""

    model: float
    hardware: float
    attention: float  # included in both; kept apart because conventions differ on counting it


def body_matmul_params(shape) -> int:
    """Weights of the body's matmuls in a :class:`forgetting_ray.plan.ModelShape`: all parameters less the
    input embedding and the output head (norms are counted too; they are < 0.1 % of a 1B model)."""
    return shape.params - shape.embedding_params - (0 if shape.tied_embeddings else head_params(shape))


def head_params(shape) -> int:
    return shape.vocab_size * shape.hidden_size


def finetune_flops(shape, *, tokens: float, head_tokens: float, seq_len: float, lora: bool, lora_params: int = 0,
                   recompute: bool) -> Flops:
    """FLOPs of training on ``tokens`` body tokens of mean sequence length ``seq_len``, ``head_tokens``
    of which reach the output head. ``shape`` is a :class:`forgetting_ray.plan.ModelShape`."""
    n_body, n_head = body_matmul_params(shape), head_params(shape)
    passes = 4 if lora else 6  # forward, input gradients[, weight gradients]
    attention = 12 * shape.num_layers * shape.hidden_size * seq_len * tokens
    model = passes * (n_body * tokens + n_head * head_tokens) + 6 * lora_params * tokens + attention
    recomputed = 0.0
    if recompute:  # the checkpointed layers' forward once more (the head sits outside them)
        recomputed = (2 * (n_body + lora_params) + 4 * shape.num_layers * shape.hidden_size * seq_len) * tokens
    return Flops(model=model, hardware=model + recomputed, attention=attention)


def scoring_flops(shape, *, tokens: float, head_tokens: float, seq_len: float, models: int = 2) -> Flops:
    """FLOPs of scoring ``tokens`` body tokens under ``models`` models (base and reference): a forward each."""
    n_body, n_head = body_matmul_params(shape), head_params(shape)
    attention = models * 4 * shape.num_layers * shape.hidden_size * seq_len * tokens
    model = models * 2 * (n_body * tokens + n_head * head_tokens) + attention
    return Flops(model=model, hardware=model, attention=attention)
