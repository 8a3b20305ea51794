"""Render one record to text, tokenize it once, and mark the trainable (assistant) positions.

Assistant spans are found by tokenizing rendered prefixes of the conversation, as the reference code
does (docs/method.md §2.2).  That only works when the tokens of a prefix are a prefix of the tokens of the
whole, so this is checked for every boundary: a silent mismatch would shift every mask after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

from ..constants import IGNORE_INDEX
from ..errors import UserError
from .readers import Message, Record

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

Template = Literal["chat_template", "tulu"]
TULU_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
_BOUNDARY_WS = (" ", "\n", "\t")


class RenderError(UserError, ValueError):
    """A record cannot be rendered or masked reliably; the message names the record's origin."""


@dataclass(frozen=True)
class Rendered:
    input_ids: list[int]
    labels: list[int]
    full_length: int  # tokens before truncation

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)

    @property
    def n_response(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def has_chat_template(tokenizer: "PreTrainedTokenizerBase") -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(tokenizer: "PreTrainedTokenizerBase", template: str) -> Template:
    if template == "auto":
        return "chat_template" if has_chat_template(tokenizer) else "tulu"
    if template == "chat_template" and not has_chat_template(tokenizer):
        raise RenderError("data.template is 'chat_template' but the tokenizer has no chat template")
    if template not in ("chat_template", "tulu"):
        raise RenderError(f"unknown template {template!r}")
    return template  # type: ignore[return-value]


def _check_prefix(prefix: Sequence[int], full: Sequence[int], tok: "PreTrainedTokenizerBase",
                  origin: str, where: str) -> None:
    if len(prefix) <= len(full) and list(full[: len(prefix)]) == list(prefix):
        return
    pos = next((i for i, (a, b) in enumerate(zip(prefix, full)) if a != b), min(len(prefix), len(full)))
    got = tok.convert_ids_to_tokens(list(prefix[pos : pos + 3]))
    want = tok.convert_ids_to_tokens(list(full[pos : pos + 3]))
    raise RenderError(
        f"{origin}: tokenization is not prefix-stable {where}: the prefix's tokens differ from the "
        f"whole sample's at token {pos} ({got} vs {want}), so the loss mask would be misaligned. "
        "Usually a merge across the turn boundary; try another data.template or clean the record's "
        "boundary whitespace."
    )


class Renderer:
    """Turns records into (input_ids, labels) for one tokenizer, template and max_length."""

    def __init__(self, tokenizer: "PreTrainedTokenizerBase", template: str = "auto", max_length: int = 2048):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.tok = tokenizer
        self.template: Template = resolve_template(tokenizer, template)
        self.max_length = max_length
        self._special_ids = set(tokenizer.all_special_ids)
        if self.template == "tulu" and tokenizer.eos_token is None:
            raise RenderError("the Tulu template needs an EOS token, and the tokenizer has none")
        if self.template == "chat_template":
            self._check_generation_prompt()

    # ------------------------------------------------------------------------------------------
    def render(self, record: Record) -> Rendered:
        if self.template == "chat_template":
            ids, labels = self._chat(record)
        elif record.schema == "prompt_completion":
            ids, labels = self._tulu_prompt_completion(record)
        else:
            ids, labels = self._tulu_messages(record)
        if not any(x != IGNORE_INDEX for x in labels):
            raise RenderError(f"{record.origin}: rendering yields no trainable (assistant) token")
        return Rendered(ids[: self.max_length], labels[: self.max_length], full_length=len(ids))

    def _encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        return [list(x) for x in self.tok(texts, add_special_tokens=add_special_tokens)["input_ids"]]

    # ------------------------------------------------------------------------------------------
    # chat template
    # ------------------------------------------------------------------------------------------
    def _apply(self, messages: list[dict[str, str]], gen: bool, origin: str) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja raises TemplateError, templates raise their own messages
            raise RenderError(f"{origin}: the chat template failed: {e}") from e

    def _check_generation_prompt(self) -> None:
        # Without a generation prompt the assistant header could not be told apart from the reply.
        probe = [{"role": "user", "content": "x"}]
        with_gen = self._apply(probe, True, "chat template check")
        if with_gen == self._apply(probe, False, "chat template check"):
            raise RenderError(
                "the chat template ignores add_generation_prompt, so the assistant header cannot be "
                "separated from the response; use data.template: tulu"
            )

    def _chat(self, record: Record) -> tuple[list[int], list[int]]:
        msgs = record.as_chat()
        origin = record.origin
        texts = [self._apply(msgs, False, origin)]
        turns: list[int] = []
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before, through = self._apply(msgs[:k], True, origin), self._apply(msgs[: k + 1], False, origin)
            if not through.startswith(before) or m["content"] not in through[len(before):]:
                raise RenderError(
                    f"{origin}: the chat template yields no assistant span for messages[{k}] (its "
                    "content does not follow the generation prompt); use data.template: tulu"
                )
            texts += [before, through]
            turns.append(k)
        enc = self._encode(texts, add_special_tokens=False)  # templates write BOS themselves
        full = enc[0]
        labels = [IGNORE_INDEX] * len(full)
        for i, k in enumerate(turns):
            start_ids, end_ids = enc[1 + 2 * i], enc[2 + 2 * i]
            _check_prefix(start_ids, full, self.tok, origin, f"before messages[{k}]")
            _check_prefix(end_ids, full, self.tok, origin, f"after messages[{k}]")
            start, end = len(start_ids), self._trim_separator(full, len(start_ids), len(end_ids))
            if end <= start:
                raise RenderError(f"{origin}: the chat template yields an empty assistant span for messages[{k}]")
            labels[start:end] = full[start:end]
        return full, labels

    def _trim_separator(self, ids: list[int], start: int, end: int) -> int:
        # Templates put a newline between turns after the end-of-turn token; it is layout, not reply,
        # and the model stops at end-of-turn, so it is not trained on.
        while end > start and ids[end - 1] not in self._special_ids and not self.tok.decode([ids[end - 1]]).strip():
            end -= 1
        return end

    # ------------------------------------------------------------------------------------------
    # Tulu (docs/method.md §2.2)
    # ------------------------------------------------------------------------------------------
    def _tulu_part(self, m: Message) -> str:
        tail = self.tok.eos_token + "\n" if m.role == "assistant" else "\n"
        return TULU_HEADERS[m.role] + m.content.strip() + tail

    def _tulu_messages(self, record: Record) -> tuple[list[int], list[int]]:
        msgs = record.messages
        parts = [self._tulu_part(m) for m in msgs]
        texts = ["".join(parts).strip()]
        spans: list[tuple[int, int | None, int | None]] = []  # (k, start text idx, end text idx)
        for k, m in enumerate(msgs):
            if m.role == "assistant":
                continue
            start_idx = None
            if k > 0:
                texts.append("".join(parts[:k]))
                start_idx = len(texts) - 1
            end_idx = None
            if k < len(msgs) - 1:  # the last turn is masked to the end (its trailing "\n" was stripped)
                nxt = TULU_HEADERS["assistant"] if msgs[k + 1].role == "assistant" else ""
                texts.append("".join(parts[: k + 1]) + nxt)
                end_idx = len(texts) - 1
            spans.append((k, start_idx, end_idx))
        enc = self._encode(texts, add_special_tokens=True)  # BOS the way the tokenizer adds it
        full = enc[0]
        labels = list(full)
        for k, s_idx, e_idx in spans:
            start = 0
            if s_idx is not None:
                _check_prefix(enc[s_idx], full, self.tok, record.origin, f"before messages[{k}]")
                start = len(enc[s_idx])
            end = len(full)
            if e_idx is not None:
                _check_prefix(enc[e_idx], full, self.tok, record.origin, f"after messages[{k}]")
                end = len(enc[e_idx])
            labels[start:end] = [IGNORE_INDEX] * (end - start)
        return full, labels

    def _tulu_prompt_completion(self, record: Record) -> tuple[list[int], list[int]]:
        prompt, completion = record.messages[0].content, record.messages[1].content
        joined = prompt.endswith(_BOUNDARY_WS) or completion.startswith(_BOUNDARY_WS)
        text = prompt + ("" if joined else " ") + completion + self.tok.eos_token
        full, prompt_ids = self._encode([text, prompt], add_special_tokens=True)
        _check_prefix(prompt_ids, full, self.tok, record.origin, "between prompt and completion")
        labels = [IGNORE_INDEX] * len(prompt_ids) + full[len(prompt_ids):]
        return full, labels
