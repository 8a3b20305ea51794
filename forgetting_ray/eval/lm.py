"""The scoring engine: log-likelihoods of choices with a shared context, and greedy/sampled generation.

Tokenization mirrors lm-evaluation-harness (``HFLM._encode_pair``): trailing spaces of the context
move to the continuation, the pair is encoded whole, the context alone, and the continuation is
``whole[len(context):]``; the model then sees ``context_ids + continuation_ids``.  Because every
choice of a question shares ``context_ids`` exactly, the context can be run once and its KV cache
reused for all choices (``prefix_reuse=True``), which gives the same log-likelihoods as one full
forward per choice (``prefix_reuse=False``, lm-eval's way) up to float rounding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..scoring import _postprocess_logits, unwrap_causal_lm

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase


class ChatTemplateError(UserError, ValueError):
    """A chat template was requested but the tokenizer has none."""


@dataclass
class ChoiceScore:
    loglikelihood: float
    is_greedy: bool  # every continuation token is the argmax (lm-eval's is_greedy)


def _max_length(model: torch.nn.Module, default: int = 2048) -> int:
    # lm-eval's resolve_max_length: the model's position limit, else 2048.
    cfg = unwrap_causal_lm(model).config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and 0 < v < 10**7:
            return v
    return default


def _out_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class Engine:
    """Runs one causal LM over evaluation requests; holds no task logic."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: "PreTrainedTokenizerBase",
        *,
        batch_size: int = 8,
        prefix_reuse: bool = True,
        chat_template: bool = False,
        max_length: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.lm = unwrap_causal_lm(model)
        self.tok = tokenizer
        self.batch_size = batch_size
        self.prefix_reuse = prefix_reuse
        if chat_template and not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ChatTemplateError(
                f"eval.chat_template is on but the tokenizer of {name!r} has no chat template; "
                "turn eval.chat_template off or use an instruction-tuned model's tokenizer"
            )
        self.chat_template = chat_template
        self.max_length = max_length or _max_length(model)
        self.device = next(model.parameters()).device
        # transformers renamed `past_key_values` to `cache` (5.2x); pass whichever the model takes.
        params = inspect.signature(self.lm.base_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    # -- tokenization (lm-eval conventions) -----------------------------------------------------
    def format_prompt(self, prompt: str) -> str:
        """The prompt as the model sees it: raw, or one user turn of the chat template."""
        if not self.chat_template:
            return prompt
        return self.tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def tok_encode(self, text: str) -> list[int]:
        # lm-eval: tokenizer defaults, but never a second BOS when the text already starts with one.
        bos = self.tok.bos_token
        if bos and text.startswith(bos):
            return list(self.tok.encode(text, add_special_tokens=False))
        return list(self.tok.encode(text))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            prefix = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
            return [prefix], self.tok_encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    # -- log-likelihood ---------------------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(self, groups: Sequence[tuple[str, Sequence[str]]]) -> list[list[ChoiceScore]]:
        """``groups[i] = (context, continuations)`` -> one :class:`ChoiceScore` per continuation."""
        encoded: list[tuple[list[int], list[list[int]]]] = []
        for context, conts in groups:
            context = self.format_prompt(context) if context else context
            pairs = [self.encode_pair(context, c) for c in conts]
            # The context encoding does not depend on the continuation: one shared prefix per group.
            encoded.append((pairs[0][0], [p[1] for p in pairs]))
        out: list[list[ChoiceScore] | None] = [None] * len(groups)
        # Length bucketing: longest first, so each batch pads little and OOMs show up at once.
        order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + max(map(len, encoded[i][1]))))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = [self._truncate(*encoded[i]) for i in idx]
            scored = self._score_prefix(batch) if self.prefix_reuse else self._score_naive(batch)
            for i, s in zip(idx, scored):
                out[i] = s
        return out  # type: ignore[return-value]

    def _truncate(self, ctx: list[int], conts: list[list[int]]) -> tuple[list[int], list[list[int]]]:
        # lm-eval keeps the last max_length+1 tokens of ctx+cont (then drops the final one as input);
        # only context tokens can fall off, and equally for every choice as long as the longest fits.
        longest = max(len(c) for c in conts)
        if any(len(c) == 0 for c in conts):
            raise ValueError("a continuation encodes to zero tokens; cannot score it")
        keep = self.max_length + 1 - longest
        if len(ctx) > keep:
            ctx = ctx[len(ctx) - max(keep, 1) :]
        return ctx, conts

    def _head_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = _postprocess_logits(self.lm.config, self.lm.get_output_embeddings()(hidden).float())
        return F.log_softmax(logits, dim=-1)

    def _score_naive(self, batch: list[tuple[list[int], list[list[int]]]]) -> list[list[ChoiceScore]]:
        """One full forward per (context, choice), right-padded, as lm-eval's HFLM does."""
        rows = [(g, ctx + cont, len(cont)) for g, (ctx, conts) in enumerate(batch) for cont in conts]
        width = max(len(r[1]) - 1 for r in rows)
        inp = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for r, (_, seq, _) in enumerate(rows):
            inp[r, : len(seq) - 1] = torch.tensor(seq[:-1])
        hidden = self.lm.base_model(input_ids=inp.to(self.device), use_cache=False).last_hidden_state
        results: list[list[ChoiceScore]] = [[] for _ in batch]
        for r, (g, seq, n) in enumerate(rows):
            pos = torch.arange(len(seq) - 1 - n, len(seq) - 1, device=self.device)
            logp = self._head_logprobs(hidden[r, pos])
            target = torch.tensor(seq[-n:], device=self.device)
            ll = logp.gather(-1, target[:, None]).sum().item()
            results[g].append(ChoiceScore(ll, bool((logp.argmax(-1) == target).all())))
        return results

    def _score_prefix(self, batch: list[tuple[list[int], list[list[int]]]]) -> list[list[ChoiceScore]]:
        """Contexts once (left-padded, KV cache kept), then every choice against its context's cache."""
        B = len(batch)
        ctx_lens = torch.tensor([len(ctx) for ctx, _ in batch])
        width = int(ctx_lens.max())
        ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        for b, (ctx, _) in enumerate(batch):
            ids[b, width - len(ctx) :] = torch.tensor(ctx)
            mask[b, width - len(ctx) :] = 1
        # Left padding shifts tokens right, so positions must come from the mask, not the index.
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        dev = self.device
        ctx_out = self.lm.base_model(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=True
        )
        first_logp = self._head_logprobs(ctx_out.last_hidden_state[:, -1])  # predicts each choice's 1st token

        pairs = [(b, cont) for b, (_, conts) in enumerate(batch) for cont in conts]
        scores = [0.0] * len(pairs)
        greedy = [True] * len(pairs)
        first_argmax = first_logp.argmax(-1)
        for p, (b, cont) in enumerate(pairs):
            scores[p] = first_logp[b, cont[0]].item()
            greedy[p] = int(first_argmax[b]) == cont[0]

        rest = max(len(c) for _, c in pairs) - 1
        if rest > 0:
            ll_sum, all_hit = self._score_after_first_token(pairs, rest, ctx_out, mask, ctx_lens)
            for p in range(len(pairs)):
                scores[p] += float(ll_sum[p])
                greedy[p] = greedy[p] and bool(all_hit[p])

        results: list[list[ChoiceScore]] = [[] for _ in batch]
        for p, (b, _) in enumerate(pairs):
            results[b].append(ChoiceScore(scores[p], greedy[p]))
        return results

    def _score_after_first_token(
        self, pairs: list[tuple[int, list[int]]], rest: int, ctx_out, mask: torch.Tensor, ctx_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (group, choice) pair: the log-likelihood sum of the choice's tokens after its first, and whether
        each of them is the argmax, from one forward of every choice after its group's cached context."""
        dev = self.device
        # Feed cont[:-1] after the cached context; output j predicts cont[j + 1].
        N = len(pairs)
        c_ids = torch.full((N, rest), self.pad_id, dtype=torch.long)
        c_mask = torch.zeros((N, rest), dtype=torch.long)
        for p, (_, cont) in enumerate(pairs):
            c_ids[p, : len(cont) - 1] = torch.tensor(cont[:-1])
            c_mask[p, : len(cont) - 1] = 1
        rows = torch.tensor([b for b, _ in pairs])
        cache = _out_cache(ctx_out)
        cache.reorder_cache(rows.to(dev))  # row p of the cache = its group's context
        full_mask = torch.cat([mask[rows], c_mask], dim=1)
        c_pos = ctx_lens[rows][:, None] + torch.arange(rest)[None, :]
        hid = self.lm.base_model(
            input_ids=c_ids.to(dev),
            attention_mask=full_mask.to(dev),
            position_ids=c_pos.to(dev),
            use_cache=True,
            **{self._cache_kw: cache},
        ).last_hidden_state
        sel_r, sel_c = c_mask.nonzero(as_tuple=True)
        logp = self._head_logprobs(hid[sel_r.to(dev), sel_c.to(dev)])
        targets = torch.tensor([pairs[r][1][c + 1] for r, c in zip(sel_r.tolist(), sel_c.tolist())], device=dev)
        tok_ll = logp.gather(-1, targets[:, None]).squeeze(-1)
        hit = logp.argmax(-1) == targets
        ll_sum = torch.zeros(N, dtype=torch.float64, device=dev).index_add_(0, sel_r.to(dev), tok_ll.double())
        all_hit = torch.ones(N, dtype=torch.bool, device=dev)
        all_hit[sel_r.to(dev)[~hit]] = False
        return ll_sum, all_hit

    # -- generation -------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        stop: Sequence[str] = ("\n",),
        max_new_tokens: int = 50,
        do_sample: bool = False,
        seed: int = 0,
    ) -> list[str]:
        """Greedy (or sampled, temperature 1) continuations, cut at the first stop string."""
        encoded = [self.tok_encode(self.format_prompt(p))[-(self.max_length - max_new_tokens) :] for p in prompts]
        out: list[str | None] = [None] * len(prompts)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        eos = self.tok.eos_token_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            texts = self._generate_batch([encoded[i] for i in idx], stop, max_new_tokens, do_sample, seed + start, eos)
            for i, t in zip(idx, texts):
                out[i] = t
        return out  # type: ignore[return-value]

    def _generate_batch(self, seqs, stop, max_new_tokens, do_sample, seed, eos) -> list[str]:
        """A plain KV-cached decode loop over a left-padded batch; stops when every row hit a stop."""
        B, width = len(seqs), max(len(s) for s in seqs)
        dev = self.device
        ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, width - len(s) :] = torch.tensor(s)
            mask[b, width - len(s) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        new_tokens: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        cache = None
        step_ids, step_pos = ids, pos
        for _ in range(max_new_tokens):
            o = self.lm.base_model(
                input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True, **{self._cache_kw: cache}
            )
            cache = _out_cache(o)
            logp = self._head_logprobs(o.last_hidden_state[:, -1])
            if do_sample:
                nxt = torch.multinomial(logp.exp().cpu(), 1, generator=gen).squeeze(-1).to(dev)
            else:
                nxt = logp.argmax(-1)
            for b in range(B):
                if done[b]:
                    continue
                t = int(nxt[b])
                if eos is not None and t == eos:
                    done[b] = True
                    continue
                new_tokens[b].append(t)
                if stop and any(s in self.tok.decode(new_tokens[b]) for s in stop):
                    done[b] = True
            if all(done):
                break
            step_ids = nxt[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
        texts = []
        for toks in new_tokens:
            text = self.tok.decode(toks, skip_special_tokens=True)
            for s in stop:
                if s and s in text:
                    text = text.split(s, 1)[0]
            texts.append(text)
        return texts
