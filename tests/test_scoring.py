"""token_nll (chunked output head, no [B, L, V] logits) against a naive full-logits computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forgetting_ray.models import load_model, load_tokenizer
from forgetting_ray.scoring import mean_response_nll, response_token_nlls, token_nll

IGNORE = -100
TEXTS = [
    "Question: what is two plus three? Let's think step by step. Two plus three is five. So the answer is 5.",
    "Is the sky blue? Yes.",
    "A longer rationale: the train leaves at noon and travels for three hours, so it arrives at three.",
    "No labels in this row at all.",
]
ARCHS = ("llama", "qwen2", "gpt_neo", "gemma3")


def naive_nll(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Independent reference: full logits -> log_softmax -> gather, shifted so out[:, j] scores token j."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    nll = -logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    nll = torch.where(targets == IGNORE, torch.zeros_like(nll), nll)
    return torch.cat([torch.zeros_like(nll[:, :1]), nll], dim=1)


def make_batch(tok, texts=TEXTS, prompt_tokens: int = 4) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels mask padding and a short 'prompt'; the last row has no labels."""
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = enc.input_ids.clone()
    labels[enc.attention_mask == 0] = IGNORE
    labels[:, :prompt_tokens] = IGNORE
    labels[-1] = IGNORE
    assert (enc.attention_mask == 0).any(), "the batch must contain right padding"
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


@pytest.fixture(scope="module")
def loaded(tiny_models) -> dict:
    out = {}
    for arch in ARCHS:
        model = load_model(tiny_models[arch]).eval()
        out[arch] = (model, load_tokenizer(tiny_models[arch]))
    return out


def odd_chunk(batch: dict[str, torch.Tensor]) -> int:
    """A chunk size dividing neither L nor the number of scored positions (a ragged last chunk)."""
    length = batch["input_ids"].shape[1]
    n_scored = int((batch["labels"][:, 1:] != IGNORE).sum())
    return next(c for c in (5, 7, 9, 11, 13) if length % c and n_scored % c)


@pytest.mark.parametrize("chunk", ["one", "odd", "large"])
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_naive(loaded, arch, chunk):
    model, tok = loaded[arch]
    batch = make_batch(tok)
    chunk_size = {"one": 1, "odd": odd_chunk(batch), "large": 1024}[chunk]
    with torch.no_grad():
        got = token_nll(model, **batch, chunk_size=chunk_size)
        want = naive_nll(model, **batch)
    assert got.dtype == torch.float32 and got.shape == batch["labels"].shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_gemma3_softcapping_is_applied(loaded):
    model, tok = loaded["gemma3"]
    assert model.config.final_logit_softcapping == 30.0
    batch = make_batch(tok)
    # Scale the head so raw logits exceed the cap: without tanh-capping the NLL would be far off.
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        saved = head.clone()
        head.mul_(200.0)
        try:
            got = token_nll(model, **batch, chunk_size=5)
            want = naive_nll(model, **batch)
            raw = model.base_model(input_ids=batch["input_ids"]).last_hidden_state @ head.T
        finally:
            head.copy_(saved)
    assert raw.abs().max() > 60  # capping matters for this batch
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-6)


def test_zeros_where_unlabelled(loaded):
    model, tok = loaded["llama"]
    batch = make_batch(tok)
    with torch.no_grad():
        got = token_nll(model, **batch, chunk_size=3)
    labels = batch["labels"]
    assert (got[:, 0] == 0).all()
    assert (got[labels == IGNORE] == 0).all()
    assert (got[-1] == 0).all()  # the row without labels
    scored = labels != IGNORE
    scored[:, 0] = False
    assert (got[scored] > 0).all()


def test_label_at_position_zero_is_not_scored(loaded):
    model, tok = loaded["qwen2"]
    batch = make_batch(tok, prompt_tokens=0)
    assert (batch["labels"][:-1, 0] != IGNORE).all()
    with torch.no_grad():
        got = token_nll(model, **batch)
    assert (got[:, 0] == 0).all()
    torch.testing.assert_close(got, naive_nll(model, **batch), atol=1e-5, rtol=0)


def test_batch_without_any_label(loaded):
    model, tok = loaded["gpt_neo"]
    batch = make_batch(tok)
    batch["labels"][:] = IGNORE
    with torch.no_grad():
        got = token_nll(model, **batch)
    assert got.dtype == torch.float32 and got.shape == batch["labels"].shape
    assert (got == 0).all()


def test_labels_may_differ_from_inputs(loaded):
    # Labels are the token ids scored at each position; they need not equal input_ids.
    model, tok = loaded["llama"]
    batch = make_batch(tok)
    scored = batch["labels"] != IGNORE
    batch["labels"][scored] = (batch["labels"][scored] + 11) % model.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(token_nll(model, **batch, chunk_size=4), naive_nll(model, **batch), atol=1e-5, rtol=0)


def test_never_materialises_full_logits(loaded, monkeypatch):
    model, tok = loaded["llama"]
    batch = make_batch(tok)
    seen: list[tuple[int, ...]] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))

    def no_full_forward(*args, **kwargs):
        raise AssertionError("token_nll must not run the full *ForCausalLM forward (it builds [B, L, V] logits)")

    monkeypatch.setattr(model, "forward", no_full_forward)
    try:
        with torch.no_grad():
            token_nll(model, **batch, chunk_size=8)
    finally:
        handle.remove()
    n_scored = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert seen and all(len(s) == 2 and s[0] <= 8 for s in seen)  # [rows <= chunk, V], never [B, L, V]
    assert sum(s[0] for s in seen) == n_scored  # the head sees only positions that predict a label


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gradients_match_naive(tiny_models, arch):
    model = load_model(tiny_models[arch]).eval()
    batch = make_batch(load_tokenizer(tiny_models[arch]))
    grads = []
    for fn in (lambda: token_nll(model, **batch, chunk_size=5), lambda: naive_nll(model, **batch)):
        model.zero_grad(set_to_none=True)
        fn().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_peft_wrapped_model(tiny_models):
    from peft import LoraConfig, get_peft_model

    model = load_model(tiny_models["llama"])
    torch.manual_seed(0)
    # init_lora_weights=False: random B, so the adapter really changes the outputs.
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    batch = make_batch(load_tokenizer(tiny_models["llama"]))
    with torch.no_grad():
        got = token_nll(peft_model, **batch, chunk_size=6)
        want = naive_nll(peft_model, **batch)
        with peft_model.disable_adapter():
            base = naive_nll(peft_model, **batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapter is in the path


def test_bfloat16_model_returns_float32(tiny_models):
    model = load_model(tiny_models["llama"], dtype="bfloat16").eval()
    batch = make_batch(load_tokenizer(tiny_models["llama"]))
    with torch.no_grad():
        got = token_nll(model, **batch, chunk_size=7)
        want = naive_nll(model, **batch)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=5e-2, rtol=1e-2)


def test_shape_mismatch_is_an_error(loaded):
    model, tok = loaded["llama"]
    batch = make_batch(tok)
    with pytest.raises(ValueError, match="shape"):
        token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"][:, :-1])


@pytest.mark.smollm2
def test_smollm2_matches_naive(smollm2_dir):
    model = load_model(smollm2_dir).eval()
    tok = load_tokenizer(smollm2_dir)
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
        )
        for q, a in [("What is 2+3?", "2+3 = 5. So the answer is 5."), ("Is water wet?", "Yes."), ("Hi", "")]
    ]
    batch = make_batch(tok, texts, prompt_tokens=6)
    with torch.no_grad():
        want = naive_nll(model, **batch)
        for chunk_size in (7, 1024):
            got = token_nll(model, **batch, chunk_size=chunk_size)
            # Observed max |diff| 1.4e-5 at NLL 1.8 (rel 8e-6): the head GEMM runs on [N, 576]
            # instead of [B*L, 576], so fp32 sums round differently; allow 1e-5 abs + 1e-5 rel.
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    scored = batch["labels"][:, 1:] != IGNORE
    mean = got[:, 1:][scored].mean().item()
    assert 0.0 < mean < 8.0  # a trained model on ChatML text


def test_mean_response_nll_is_each_rows_own_mean_over_its_response(loaded):
    model, tok = loaded["llama"]
    model.train()
    rows = []
    for text, prompt in zip(TEXTS[:3], (4, 2, 6)):
        ids = tok(text).input_ids
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    got = mean_response_nll(model, rows, tok.pad_token_id or 0, batch_size=2)  # batched by length, padded
    assert model.training  # left as it came
    tokens = response_token_nlls(model, rows, tok.pad_token_id or 0, batch_size=2)
    model.eval()
    for row, value, token_values in zip(rows, got, tokens):
        ids = torch.tensor([row["input_ids"]])
        nll = naive_nll(model, ids, torch.ones_like(ids), torch.tensor([row["labels"]]))
        assert value == pytest.approx(float(nll.sum() / (torch.tensor(row["labels"][1:]) != IGNORE).sum()), rel=1e-4)
        want = nll[0, 1:][torch.tensor(row["labels"][1:]) != IGNORE]  # one per response token, in order
        np.testing.assert_allclose(token_values, want.detach().numpy(), rtol=1e-4, atol=1e-5)
