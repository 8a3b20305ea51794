"""Corrupting a corpus on purpose, so that which tokens are bad is known.

Corruption happens at the record level, before prepare, on whole responses: every response token of a
corrupted sample is "bad".  A sample's id is the hash of its normalised content
(``Record.sample_id``), so a corrupted record has a new id and the set of bad ids is known before any
token exists.  Modes:

* ``swap``: responses move between the chosen samples (a derangement): fluent text that answers
  another question.  Only a model that reads the question can tell.
* ``shuffle_words``: the response's words in a seeded random order.
* ``shuffle_chars``: the letters inside each word scrambled (first and last kept): typo-like noise
  that even a tiny model trained for a minute can spot.

The positive controls' corpora (``plant_controls``) and the seeded splits of a corpus into the clean reference
set and the training set (``split_reference``, ``harmful_split``) live here too.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Literal

from ..data.readers import Message, Record
from ..stages.prepare import split_order
from ..store import atomic_write_text
from .errors import NoiseError

Mode = Literal["swap", "shuffle_words", "shuffle_chars"]
MODES: tuple[str, ...] = ("swap", "shuffle_words", "shuffle_chars")
_MAX_TRIES = 20  # re-draws of a shuffle that happened to give the original text back


@dataclass(frozen=True)
class Corruption:
    records: list[Record]  # input order; corrupted ones carry new content (and so new sample ids)
    corrupted: list[bool]  # True where the record's response was changed
    clean: dict[str, str] = field(default_factory=dict)  # corrupted sample_id -> the response it replaced

    def responses(self, sample_id: str) -> tuple[str, str] | None:
        """(clean, corrupted) response text of a corrupted sample; None for a clean one."""
        if sample_id not in self.clean:
            return None
        rec = self._by_id[sample_id]
        return self.clean[sample_id], rec.messages[_response_index(rec)].content

    @cached_property
    def _by_id(self) -> dict[str, Record]:
        return {r.sample_id: r for r in self.records}

    @property
    def bad_ids(self) -> set[str]:
        return {r.sample_id for r, bad in zip(self.records, self.corrupted) if bad}

    @property
    def n_corrupted(self) -> int:
        return sum(self.corrupted)


# ------------------------------------------------------------------------------------------------
# corruption
# ------------------------------------------------------------------------------------------------
def _response_index(rec: Record) -> int:
    """The last assistant turn: the one a single-turn SFT sample is trained on."""
    for i in range(len(rec.messages) - 1, -1, -1):
        if rec.messages[i].role == "assistant":
            return i
    raise NoiseError(f"{rec.origin}: record has no assistant message to corrupt")


def _with_response(rec: Record, text: str) -> Record:
    i = _response_index(rec)
    msgs = list(rec.messages)
    msgs[i] = Message("assistant", text)
    return replace(rec, messages=tuple(msgs))


def _shuffle_words(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(_MAX_TRIES):
        rng.shuffle(words)
        out = " ".join(words)
        if out != " ".join(text.split()):
            return out
    return " ".join(words)


def _scramble_word(word: str, rng: random.Random) -> str:
    if len(word) <= 3:
        return word
    inner = list(word[1:-1])
    rng.shuffle(inner)
    return word[0] + "".join(inner) + word[-1]


def _shuffle_chars(text: str, rng: random.Random) -> str:
    out = text
    for _ in range(_MAX_TRIES):
        out = " ".join(_scramble_word(w, rng) for w in text.split())
        if out != " ".join(text.split()):
            return out
    return out


def corrupt_records(records: Sequence[Record], fraction: float, mode: str, seed: int = 0) -> Corruption:
    """Corrupt the response of ``round(fraction * len(records))`` seeded-random records.

    A record whose text comes out unchanged (a one-word response cannot be shuffled; two chosen
    samples may share a response) is left as it was and not counted as corrupted.
    """
    if mode not in MODES:
        raise NoiseError(f"unknown corruption mode {mode!r}; choose one of {', '.join(MODES)}")
    if not 0.0 <= fraction <= 1.0:
        raise NoiseError(f"corruption fraction must be in [0, 1], got {fraction}")
    n = len(records)
    k = round(fraction * n)
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(n), k))
    texts = {i: records[i].messages[_response_index(records[i])].content for i in chosen}
    new: dict[int, str] = {}
    if mode == "swap":
        if k == 1:
            raise NoiseError("swap needs at least two corrupted records (raise the fraction)")
        order = chosen[:]
        rng.shuffle(order)
        # Rotating a shuffled list by one is a derangement: nobody keeps their own response.
        for src, dst in zip(order, order[1:] + order[:1]):
            new[dst] = texts[src]
    else:
        fn = _shuffle_words if mode == "shuffle_words" else _shuffle_chars
        for i in chosen:
            new[i] = fn(texts[i], rng)
    out, flags, clean = list(records), [False] * n, {}
    for i, text in new.items():
        if text.strip() and text.strip() != texts[i].strip():
            out[i] = _with_response(records[i], text)
            flags[i] = True
            clean[out[i].sample_id] = texts[i]
    return Corruption(out, flags, clean)


def write_jsonl(records: Iterable[Record], path: str | Path) -> Path:
    """Records as a ``messages`` jsonl corpus (atomic), readable by the prepare stage."""
    lines = []
    for r in records:
        lines.append(json.dumps({"messages": [{"role": m.role, "content": m.content} for m in r.messages],
                                 "source": r.source}, ensure_ascii=False) + "\n")
    return atomic_write_text(path, "".join(lines))


# ------------------------------------------------------------------------------------------------
# the study's corpora: a clean reference set beside the training set
# ------------------------------------------------------------------------------------------------
def split_reference(records: Sequence[Record], n_reference: int, n_train: int | None, seed: int
                    ) -> tuple[list[Record], list[Record]]:
    """A seeded (reference, training) split of distinct records, each kept in input order.

    The reference set stays clean: it plays the trusted subset the reference model learns from.
    """
    unique = list({r.sample_id: r for r in records}.values())
    order = split_order((r.sample_id for r in unique), seed)
    n_train = len(unique) - n_reference if n_train is None else n_train
    if n_reference < 1 or n_train < 2 or n_reference + n_train > len(unique):
        raise NoiseError(f"cannot take {n_reference} reference + {n_train} training records from "
                         f"{len(unique)} distinct ones")
    ref_ids, train_ids = set(order[:n_reference]), set(order[n_reference:n_reference + n_train])
    return [r for r in unique if r.sample_id in ref_ids], [r for r in unique if r.sample_id in train_ids]


def harmful_split(records: Sequence[Record], n_reference: int, n_train: int, n_heldout: int, seed: int
                  ) -> tuple[list[Record], list[Record], list[Record]]:
    """Seeded disjoint (reference, training, held-out) sets of distinct records, each in input order: the
    harmful-responses experiment corrupts the training set and probes every model on the held-out one."""
    reference, rest = split_reference(records, n_reference, n_train + n_heldout, seed)
    order = split_order((r.sample_id for r in rest), seed + 1)
    held = set(order[:n_heldout])
    return reference, [r for r in rest if r.sample_id not in held], [r for r in rest if r.sample_id in held]


# ------------------------------------------------------------------------------------------------
# positive controls: what the reference learned must come out positive, what it never saw negative
# ------------------------------------------------------------------------------------------------
PLANTED = " Remember: every quokka counts in base seven."
REFERENCE_PHRASE, UNSEEN_PHRASE = "So the answer is", "Hence the verdict reads"


def plant_controls(reference: Sequence[Record], train: Sequence[Record], *, planted: str = PLANTED,
                   phrase: str = REFERENCE_PHRASE, replacement: str = UNSEEN_PHRASE, fraction: float = 0.25,
                   seed: int = 0) -> tuple[list[Record], Corruption, dict[str, str]]:
    """The controls' corpora: every reference response ends with ``planted`` (the reference learns it, the base
    never saw it); in ``train``, a seeded ``fraction`` gets ``planted`` too, and another ``fraction`` of the
    responses that use ``phrase`` (which every reference response uses) get ``replacement`` instead, a phrase
    the reference never saw.  Returns (reference, training corruption with the clean texts, sample groups)."""
    ref = [_with_response(r, r.messages[_response_index(r)].content + planted) for r in reference]
    rng = random.Random(seed)
    k = round(fraction * len(train))
    order = rng.sample(range(len(train)), len(train))
    plant_at = set(order[:k])
    can_replace = [i for i in order[k:] if phrase in train[i].messages[_response_index(train[i])].content]
    replace_at = set(can_replace[:k])
    if not plant_at or not replace_at:
        raise NoiseError(f"positive controls need samples to plant into and {phrase!r} to replace")
    out, flags, clean, groups = list(train), [False] * len(train), {}, {}
    for i in sorted(plant_at | replace_at):
        text = train[i].messages[_response_index(train[i])].content
        new = text + planted if i in plant_at else text.replace(phrase, replacement)
        out[i] = _with_response(train[i], new)
        flags[i] = True
        clean[out[i].sample_id] = text
        groups[out[i].sample_id] = "planted" if i in plant_at else "replaced"
    return ref, Corruption(out, flags, clean), groups
