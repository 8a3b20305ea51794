"""Per-token negative log-likelihood without materialising [batch, length, vocab] logits.

``token_nll`` runs the model's backbone once, keeps only the hidden states at positions whose next
token carries a label, and pushes those through the output head ``chunk_size`` rows at a time.
Peak extra memory is ``chunk_size x vocab`` floats instead of ``batch x length x vocab``
(docs/method.md §11 item 14), and prompt/padding positions cost nothing at the head.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .constants import IGNORE_INDEX, logit_chunk_rows
from .data.collate import collate


def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` inside DDP/DeepSpeed (``.module``) and PEFT (``get_base_model``) wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            inner = model.module
        else:
            return model
        if inner is model:
            return model
        model = inner


def _postprocess_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """Logit transforms some architectures apply after the head (Gemma soft-capping, Cohere/Granite scaling)."""
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(config, "logit_scale", None)  # Cohere multiplies
    if scale is not None and not isinstance(scale, bool):
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)  # Granite divides
    if divisor:
        logits = logits / divisor
    return logits


def token_nll(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``out[b, j] = -log p(input_ids[b, j] | input_ids[b, :j])`` where ``labels[b, j] != -100``, else 0.

    Returns float32 ``[B, L]``, aligned with ``labels`` (position 0 is always 0).  Differentiable:
    the training loss uses the same kernel.  ``labels`` holds the token ids to score (normally
    ``input_ids`` with non-response positions set to -100).  ``chunk_size`` defaults to the
    number of rows whose logits fit in ``constants.CHUNK_BYTES``, so memory stays bounded at any vocabulary.
    """
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ in shape")
    lm = unwrap_causal_lm(model)
    backbone = lm.base_model
    if backbone is lm:
        raise TypeError(f"{type(lm).__name__} exposes no backbone (base_model); not a *ForCausalLM?")
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    head = lm.get_output_embeddings()
    if chunk_size is None:
        vocab = getattr(head, "out_features", None) or lm.config.vocab_size  # weight is [0]-shaped under ZeRO-3
        chunk_size = logit_chunk_rows(vocab)

    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # cols index the predicting position
    picked = hidden[rows, cols]  # [N, H]: the only positions the head must see
    wanted = targets[rows, cols]
    pieces = []
    for start in range(0, picked.shape[0], chunk_size):
        logits = _postprocess_logits(lm.config, head(picked[start : start + chunk_size]).float())
        pieces.append(F.cross_entropy(logits, wanted[start : start + chunk_size], reduction="none"))
    out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    if pieces:
        out = out.index_put((rows, cols + 1), torch.cat(pieces))
    return out


def naive_token_nll(model: torch.nn.Module, input_ids, attention_mask, labels) -> torch.Tensor:
    """Reference implementation with full logits (tests and benchmarks only)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    nll = -logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid
    return F.pad(nll, (1, 0))


@torch.no_grad()
def response_token_nlls(model: torch.nn.Module, rows, pad_token_id: int, *, batch_size: int = 8,
                        batches: Iterable[Sequence[int]] | None = None,
                        chunk_size: int | None = None) -> list[np.ndarray]:
    """Each row's response-token NLLs (``labels != -100``; position 0 has nothing before it), in row order.
    ``rows``: token-table rows (``input_ids``, ``labels``). Rows are batched by length, ``batch_size`` at a
    time, so that padding stays small; ``batches`` (lists of row indices, e.g. cut to a token budget) replaces
    that batching, and ``chunk_size`` goes to :func:`token_nll`. The model runs on its own device and is left
    in the mode it came in."""
    was_training = model.training
    model.eval()
    if batches is None:
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    out = [np.empty(0, dtype=np.float32)] * len(rows)
    device = next(model.parameters()).device
    try:
        for picked in batches:
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in picked], pad_token_id).items()}
            nll = token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                            chunk_size=chunk_size).float().cpu()
            scored = batch["labels"].ne(IGNORE_INDEX).cpu()
            scored[:, 0] = False
            for j, i in enumerate(picked):
                out[i] = nll[j][scored[j]].numpy()
    finally:
        model.train(was_training)
    return out


def mean_response_nll(model: torch.nn.Module, rows, pad_token_id: int, *, batch_size: int = 8) -> np.ndarray:
    """Mean NLL over each row's response tokens, in row order (0 for a row without any): how well a model
    fits whole answers."""
    return np.array([x.sum(dtype=np.float64) / max(x.size, 1)
                     for x in response_token_nlls(model, rows, pad_token_id, batch_size=batch_size)])
