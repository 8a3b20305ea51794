"""The token-level view of a study: the stage outputs joined into flat, aligned arrays of response tokens.

``load_token_view`` joins the partition stage's table with the score shards; ``changed_tokens`` marks which of
a corrupted response's tokens carry characters the corruption changed (token-exact), and ``format_token_marks``
the end-of-turn and answer-format tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path

import numpy as np

from ..data.score_set import iter_score_shards
from ..data.table import IGNORE_INDEX
from ..data.tokens import decode_pieces
from ..models import load_tokenizer
from .corruption import REFERENCE_PHRASE, Corruption
from .errors import NoiseError


# ------------------------------------------------------------------------------------------------
# which tokens changed
# ------------------------------------------------------------------------------------------------
MIN_SHARED_CHARS = 4  # shorter common fragments ("is", a letter) are coincidence, not text kept


def changed_characters(clean: str, corrupted: str) -> np.ndarray:
    """Per character of ``corrupted``: not part of a block of at least MIN_SHARED_CHARS it shares with
    ``clean`` (difflib's matching blocks, no junk heuristic).  A swapped-in answer keeps the phrases both
    answers use ("So the answer is"); a scrambled word is changed as a whole."""
    changed = np.ones(len(corrupted), dtype=bool)
    for _, b, size in SequenceMatcher(None, clean, corrupted, autojunk=False).get_matching_blocks():
        if size >= MIN_SHARED_CHARS:
            changed[b:b + size] = False
    return changed


def changed_tokens(pieces: Sequence[str], clean: str, corrupted: str) -> np.ndarray:
    """Per response token (``pieces``: each token's text, as :func:`data.tokens.decode_pieces` gives it):
    does it cover a changed character of the corrupted response?  The tokens' text is aligned to the
    response text (difflib), so a response cut by ``data.max_length`` or re-spaced by the chat template
    still lines up; text the template added (the end-of-turn marker) is unchanged."""
    text = "".join(pieces)
    at = np.full(len(text), -1)  # the corrupted response's character each decoded character stands for
    for a, b, size in SequenceMatcher(None, text, corrupted, autojunk=False).get_matching_blocks():
        at[a:a + size] = np.arange(b, b + size)
    if not (at >= 0).sum() >= min(len(text), len(corrupted), MIN_SHARED_CHARS):
        raise NoiseError(f"the corrupted response is not in its decoded tokens: {corrupted[:60]!r}")
    changed = np.zeros(len(text), dtype=bool)
    changed[at >= 0] = changed_characters(clean, corrupted)[at[at >= 0]]
    ends = np.cumsum([len(p) for p in pieces])
    return np.array([bool(changed[e - len(p):e].any()) for p, e in zip(pieces, ends)], dtype=bool)


# ------------------------------------------------------------------------------------------------
# reading the stage outputs
# ------------------------------------------------------------------------------------------------
@dataclass
class TokenView:
    """Response tokens of a partitioned table, flat and aligned: score, class, bad, owning sample."""

    score: np.ndarray
    token_class: np.ndarray
    bad: np.ndarray  # every token of a corrupted sample
    sample: np.ndarray  # row index in the table of each token
    sample_ids: list[str]
    changed: np.ndarray | None = None  # token-exact: the tokens whose characters the corruption changed
    nll_base: np.ndarray | None = None
    nll_ref: np.ndarray | None = None


def _iter_partition_rows(partition_table: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(partition_table)
    for batch in pf.iter_batches(columns=["sample_id", "input_ids", "labels", "token_class"], batch_size=1024):
        d = batch.to_pydict()
        for sid, ids, labels, cls in zip(d["sample_id"], d["input_ids"], d["labels"], d["token_class"]):
            yield sid, np.asarray(ids), np.asarray(labels), np.asarray(cls, dtype=np.int8)


ChangedOf = Callable[[str, np.ndarray], "np.ndarray | None"]  # (sample_id, response token ids) -> changed flags


def load_token_view(partition_table: str | Path, score_dir: str | Path, bad_ids: set[str],
                    changed_of: ChangedOf | None = None) -> TokenView:
    """Join the partition stage's table (``token_class``) with the score shards (score and both NLLs) by
    sample id; both list response tokens in position order, so they align token for token.  ``changed_of``
    marks a corrupted sample's changed tokens (None: the sample is clean)."""
    columns = ("score", "nll_base", "nll_ref")
    of: dict[str, tuple[np.ndarray, ...]] = {}
    for _, shard in iter_score_shards(Path(score_dir), columns=["sample_id", *columns]):
        cols = [shard.column(c).to_pylist() for c in columns]
        for sid, *vals in zip(shard.column("sample_id").to_pylist(), *cols):
            of[sid] = tuple(np.asarray(v, dtype=np.float32) for v in vals)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("score", "nll_base", "nll_ref", "cls", "bad", "changed", "owner")}
    ids = []
    for row, (sid, input_ids, labels, cls) in enumerate(_iter_partition_rows(Path(partition_table))):
        resp = labels != IGNORE_INDEX
        if sid not in of:
            raise NoiseError(f"{partition_table}: sample {sid} has no scores in {score_dir}")
        sc, nb, nr = of[sid]
        if sc.size != int(resp.sum()):
            raise NoiseError(f"sample {sid}: {sc.size} scores for {int(resp.sum())} response tokens")
        changed = changed_of(sid, input_ids[resp]) if changed_of is not None and sid in bad_ids else None
        for k, v in (("score", sc), ("nll_base", nb), ("nll_ref", nr), ("cls", cls[resp]),
                     ("bad", np.full(sc.size, sid in bad_ids)), ("owner", np.full(sc.size, row)),
                     ("changed", changed if changed is not None else np.zeros(sc.size, dtype=bool))):
            parts[k].append(v)
        ids.append(sid)
    if not ids:
        raise NoiseError(f"{partition_table} has no rows")
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    return TokenView(cat["score"], cat["cls"], cat["bad"], cat["owner"], ids,
                     changed=cat["changed"] if changed_of is not None else None,
                     nll_base=cat["nll_base"], nll_ref=cat["nll_ref"])


def format_token_marks(partition_table: str | Path, tokenizer, phrase: str | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(end of turn, answer format) for every response token, in ``load_token_view``'s order: the last
    response token of each sample (the chat template's end-of-turn marker), and the tokens whose text
    overlaps an occurrence of ``phrase`` (default: the corpus's "So the answer is") in the decoded response.
    These are the tokens the base model already predicts well that gradient ascent can damage."""
    phrase = phrase or REFERENCE_PHRASE
    eot, fmt = [], []
    for _, input_ids, labels, _ in _iter_partition_rows(Path(partition_table)):
        pieces = decode_pieces(tokenizer, input_ids[labels != IGNORE_INDEX].tolist())
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        text, hit = "".join(pieces), np.zeros(len(pieces), dtype=bool)
        at = text.find(phrase)
        while at >= 0:
            hit |= (starts < at + len(phrase)) & (ends > at)
            at = text.find(phrase, at + 1)
        last = np.zeros(len(pieces), dtype=bool)
        last[-1:] = True
        eot.append(last)
        fmt.append(hit)
    return np.concatenate(eot), np.concatenate(fmt)


def token_exact_marks(model, corrupted: Corruption) -> ChangedOf:
    """Token-exact marks from the tokenizer of ``model`` (the run's ModelConfig): each response token's text,
    against the changed characters of its response."""
    tok = load_tokenizer(model)

    def changed(sample_id: str, response_ids: np.ndarray) -> np.ndarray | None:
        texts = corrupted.responses(sample_id)
        return None if texts is None else changed_tokens(decode_pieces(tok, response_ids.tolist()), *texts)

    return changed
