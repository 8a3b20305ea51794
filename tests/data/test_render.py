"""Rendering and loss masks (forgetting_ray.data.render): chat templates, the Tulu template, truncation."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from forgetting_ray.config import DataConfig
from forgetting_ray.data.readers import Record, normalize_record, read_records
from forgetting_ray.data.render import IGNORE_INDEX, Renderer, RenderError, resolve_template

from conftest import DOLLY_FILE, FLAN_DIR


@pytest.fixture(scope="module")
def chat_tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def plain_tok(tiny_plain_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_plain_tokenizer_dir)


def rec(raw: dict, origin: str = "test.jsonl:1") -> Record:
    return normalize_record(raw, DataConfig(), default_source="test", origin=origin)


def trained_text(tok, r) -> str:
    return tok.decode([t for t in r.labels if t != IGNORE_INDEX])


def spans(labels: list[int]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, x in enumerate(labels + [IGNORE_INDEX]):
        if x != IGNORE_INDEX and start is None:
            start = i
        elif x == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


MULTI = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Is the sky blue?"},
    {"role": "assistant", "content": "Yes, on a clear day."},
    {"role": "user", "content": "And at night?"},
    {"role": "assistant", "content": "It looks black."},
]}


# ------------------------------------------------------------------------------------------------
# chat template
# ------------------------------------------------------------------------------------------------
def test_template_resolution(chat_tok, plain_tok):
    assert resolve_template(chat_tok, "auto") == "chat_template"
    assert resolve_template(plain_tok, "auto") == "tulu"
    assert resolve_template(chat_tok, "tulu") == "tulu"
    with pytest.raises(RenderError, match=r"^data\.template is 'chat_template' but the tokenizer has no chat template"):
        resolve_template(plain_tok, "chat_template")


def test_chat_single_turn_trains_content_and_end_of_turn_only(chat_tok):
    r = Renderer(chat_tok, "auto", 512).render(rec({"prompt": " What is 2+2? ", "completion": "It is 4."}))
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    assert r.input_ids == list(chat_tok.apply_chat_template(chat, tokenize=True)["input_ids"])
    assert trained_text(chat_tok, r) == "It is 4.<|im_end|>"
    (start, end), = spans(r.labels)
    assert chat_tok.decode(r.input_ids[:start]).endswith("<|im_start|>assistant\n")  # header is masked
    assert chat_tok.decode(r.input_ids[end:]) == "\n"  # the turn separator is layout, not reply
    assert all(lab == tid for lab, tid in zip(r.labels[start:end], r.input_ids[start:end]))
    assert not r.truncated and r.n_response == end - start


def test_chat_multi_turn_masks_system_user_and_headers(chat_tok):
    r = Renderer(chat_tok, "chat_template", 512).render(rec(MULTI))
    texts = [chat_tok.decode(r.input_ids[s:e]) for s, e in spans(r.labels)]
    assert texts == ["Yes, on a clear day.<|im_end|>", "It looks black.<|im_end|>"]
    masked = chat_tok.decode([t for t, lab in zip(r.input_ids, r.labels) if lab == IGNORE_INDEX])
    assert "Be brief." in masked and "And at night?" in masked and masked.count("<|im_start|>assistant\n") == 2


def test_chat_template_without_assistant_span_is_an_error(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(RenderError, match=r"x\.jsonl:7: the chat template yields no assistant span for messages\[1\]"):
        Renderer(tok, "auto", 512).render(rec({"prompt": "q", "completion": "a"}, origin="x.jsonl:7"))


def test_chat_template_ignoring_generation_prompt_is_an_error(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    with pytest.raises(RenderError, match="ignores add_generation_prompt"):
        Renderer(tok, "chat_template", 512)


def test_chat_template_that_raises_names_the_record(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + tok.chat_template
    )
    with pytest.raises(RenderError, match=r"sys\.jsonl:3: the chat template failed: System role not supported"):
        Renderer(tok, "chat_template", 512).render(rec(MULTI, origin="sys.jsonl:3"))


# ------------------------------------------------------------------------------------------------
# Tulu template (docs/method.md §2.2)
# ------------------------------------------------------------------------------------------------
def test_tulu_messages_exact_text_and_mask(plain_tok):
    r = Renderer(plain_tok, "auto", 512).render(rec(MULTI))
    eos = plain_tok.eos_token
    assert plain_tok.decode(r.input_ids) == (
        "<|system|>\nBe brief.\n<|user|>\nIs the sky blue?\n<|assistant|>\nYes, on a clear day."
        + eos + "\n<|user|>\nAnd at night?\n<|assistant|>\nIt looks black." + eos
    )
    texts = [plain_tok.decode(r.input_ids[s:e]) for s, e in spans(r.labels)]
    # the "\n" after EOS is trained when another turn follows; the final one was stripped
    assert texts == ["Yes, on a clear day." + eos + "\n", "It looks black." + eos]


def test_tulu_with_a_chat_tokenizer_uses_its_eos(chat_tok):
    r = Renderer(chat_tok, "tulu", 512).render(rec({"messages": MULTI["messages"][1:3]}))
    assert trained_text(chat_tok, r) == "Yes, on a clear day.<|im_end|>"
    assert chat_tok.decode(r.input_ids).startswith("<|user|>\n")


@pytest.mark.parametrize(
    "prompt, completion, sep",
    [("Q: 2+2?\nA:", "4", " "), ("Q: 2+2?\nA:", " 4", ""), ("Q: 2+2?\nA:", "\n4", ""), ("Q:\n", "four", "")],
)
def test_tulu_prompt_completion_separator_rule(plain_tok, prompt, completion, sep):
    r = Renderer(plain_tok, "tulu", 512).render(rec({"prompt": prompt, "completion": completion}))
    assert plain_tok.decode(r.input_ids) == prompt + sep + completion + plain_tok.eos_token
    n_prompt = len(plain_tok(prompt)["input_ids"])
    assert r.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and IGNORE_INDEX not in r.labels[n_prompt:]
    assert trained_text(plain_tok, r) == sep + completion + plain_tok.eos_token


def test_prefix_instability_is_reported(plain_tok):
    # "Hello " + "world": the prompt ends in a lone space token that the whole text merges into " world".
    record = rec({"prompt": "Hello ", "completion": "world"}, origin="p.jsonl:4")
    with pytest.raises(RenderError, match=r"p\.jsonl:4: tokenization is not prefix-stable between prompt and"):
        Renderer(plain_tok, "tulu", 512).render(record)


# ------------------------------------------------------------------------------------------------
# truncation
# ------------------------------------------------------------------------------------------------
def test_truncation_keeps_the_head(plain_tok):
    full = Renderer(plain_tok, "tulu", 4096).render(rec(MULTI))
    cut = Renderer(plain_tok, "tulu", 20).render(rec(MULTI))
    assert cut.truncated and not full.truncated and cut.full_length == len(full.input_ids)
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]


def test_fully_truncated_response_has_no_trainable_token(chat_tok):
    r = Renderer(chat_tok, "chat_template", 8).render(rec({"prompt": "word " * 50, "completion": "yes"}))
    assert r.truncated and r.n_response == 0 and len(r.input_ids) == 8


def test_max_length_must_leave_room(chat_tok):
    with pytest.raises(ValueError, match="max_length"):
        Renderer(chat_tok, "auto", 1)


# ------------------------------------------------------------------------------------------------
# real corpora: every mask decodes to exactly the response + end-of-turn marker
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["chat", "plain"])
def test_real_flan_and_dolly_masks(chat_tok, plain_tok, which):
    tok = chat_tok if which == "chat" else plain_tok
    renderer = Renderer(tok, "auto", 100_000)
    flan = list(read_records(sorted(FLAN_DIR.glob("*.tsv")), DataConfig(), limit=150))
    dolly = list(read_records([DOLLY_FILE], DataConfig(column_map={"answer": "completion"})))
    for record in flan + dolly:
        r = renderer.render(record)
        reply = record.messages[-1].content
        if which == "chat":
            expected = reply.strip() + "<|im_end|>"
        else:
            prompt = record.messages[0].content
            joined = record.schema == "messages" or prompt.endswith((" ", "\n")) or reply.startswith((" ", "\n"))
            expected = ("" if joined else " ") + reply.strip() + tok.eos_token
        assert trained_text(tok, r) == expected, record.origin
        assert len(spans(r.labels)) == 1
