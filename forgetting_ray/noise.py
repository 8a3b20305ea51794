"""Controlled label noise: corrupt a known share of a corpus, then measure how well the scores find it.

The check needs no benchmark.  Corrupt the responses of a seeded fraction of the training records
(``corrupt_records``), run the real prepare -> reference -> score -> partition stages on them, and ask
two questions of the output (``recovery_report``):

* does the score rank corrupted tokens below clean ones?  ``auroc`` = P(score of a clean token >
  score of a corrupted token), ties counted one half: 0.5 is chance, 1.0 a perfect separation, and a
  sign-flipped score gives ``1 - auroc``;
* does the negative class (the bottom ``1 - rho`` of the scores) hold the corrupted tokens?
  ``negative_set_quality`` = precision and recall of that set against the corrupted tokens, next to
  what a random split would get (precision = the corrupted share, recall = the negative share).

Corruption happens at the record level, before prepare, on whole responses: every response token of a
corrupted sample is "bad".  A sample's id is the hash of its normalised content
(``Record.sample_id``), so a corrupted record has a new id and the set of bad ids is known before any
token exists.  Modes:

* ``swap``: responses move between the chosen samples (a derangement): fluent text that answers
  another question.  Only a model that reads the question can tell.
* ``shuffle_words``: the response's words in a seeded random order.
* ``shuffle_chars``: the letters inside each word scrambled (first and last kept): typo-like noise
  that even a tiny model trained for a minute can spot.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from difflib import SequenceMatcher
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .data.readers import Message, Record
from .data.score_set import iter_score_shards
from .data.table import IGNORE_INDEX
from .errors import UserError
from .models import load_tokenizer
from .report.html import decode_pieces
from .selection import SCORE_VARIANTS, partition, three_way, variant_scores
from .stages.partition import run_partition
from .stages.prepare import run_prepare, split_order
from .stages.score import run_score
from .stages.train import run_finetune
from .store import atomic_write_text, run_root

Mode = Literal["swap", "shuffle_words", "shuffle_chars"]
MODES: tuple[str, ...] = ("swap", "shuffle_words", "shuffle_chars")
_MAX_TRIES = 20  # re-draws of a shuffle that happened to give the original text back


class NoiseError(UserError, ValueError):
    pass


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
    """Per response token (``pieces``: each token's text, as :func:`report.html.decode_pieces` gives it):
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
# metrics
# ------------------------------------------------------------------------------------------------
def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (what the Mann-Whitney U statistic needs)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(scores: np.ndarray, bad: np.ndarray) -> float:
    """P(score of a random clean token > score of a random bad token), ties one half.

    1.0 = every corrupted token scores below every clean one; 0.5 = no information.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    b = np.asarray(bad, dtype=bool).ravel()
    if s.shape != b.shape:
        raise NoiseError(f"scores {s.shape} and bad {b.shape} differ in shape")
    if not np.isfinite(s).all():
        raise NoiseError("scores hold NaN or infinite values")
    n_bad, n_clean = int(b.sum()), int((~b).sum())
    if n_bad == 0 or n_clean == 0:
        raise NoiseError(f"AUROC needs both classes: {n_bad} corrupted and {n_clean} clean tokens")
    ranks = _average_ranks(s)
    u_clean = ranks[~b].sum() - n_clean * (n_clean + 1) / 2.0
    return float(u_clean / (n_clean * n_bad))


def negative_set_quality(token_class: np.ndarray, bad: np.ndarray) -> dict[str, float]:
    """Precision/recall of the negative class (token_class < 0) as a detector of the bad tokens,
    with what a random split of the same sizes would get."""
    c = np.asarray(token_class).ravel()
    b = np.asarray(bad, dtype=bool).ravel()
    if c.shape != b.shape:
        raise NoiseError(f"token_class {c.shape} and bad {b.shape} differ in shape")
    if c.size == 0:
        raise NoiseError("no tokens")
    neg = c < 0
    hit = int((neg & b).sum())
    n_neg, n_bad = int(neg.sum()), int(b.sum())
    precision = hit / n_neg if n_neg else float("nan")
    recall = hit / n_bad if n_bad else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "random_precision": n_bad / c.size,  # a random negative set is corrupted at the base rate
        "random_recall": n_neg / c.size,  # ... and catches the negative share of the bad tokens
        "n_tokens": float(c.size),
        "n_negative": float(n_neg),
        "n_bad": float(n_bad),
    }


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


def sample_mean_scores(view: TokenView, values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean score per sample, sample is bad): the sample-level view of the same scores (or of ``values``)."""
    n = len(view.sample_ids)
    values = view.score if values is None else values
    sums = np.bincount(view.sample, weights=values.astype(np.float64), minlength=n)
    counts = np.bincount(view.sample, minlength=n)
    bad = np.zeros(n, dtype=bool)
    bad[view.sample[view.bad]] = True
    return sums / np.maximum(counts, 1), bad


def recovery_report(view: TokenView) -> dict[str, float]:
    """Token AUROC, sample AUROC (mean score per sample) and the negative set's precision/recall."""
    mean, bad_sample = sample_mean_scores(view)
    out = {
        "token_auroc": auroc(view.score, view.bad),
        "sample_auroc": auroc(mean, bad_sample),
        "bad_token_share": float(view.bad.mean()),
        "mean_score_clean": float(view.score[~view.bad].mean()),
        "mean_score_bad": float(view.score[view.bad].mean()),
        "n_samples": float(len(view.sample_ids)),
        "n_bad_samples": float(bad_sample.sum()),
    }
    out.update({f"neg_{k}": v for k, v in negative_set_quality(view.token_class, view.bad).items()})
    if view.changed is not None and view.changed.any():
        out["changed_token_share"] = float(view.changed.mean())
        out["changed_share_of_bad_samples"] = float(view.changed[view.bad].mean())
        out.update({f"exact_neg_{k}": v for k, v in negative_set_quality(view.token_class, view.changed).items()})
    out["auroc"] = signal_aurocs(view)
    return out


def signal_aurocs(view: TokenView, seed: int = 0) -> dict[str, dict[str, float]]:
    """AUROC of the score beside the baselines a score must beat: -NLL_base (the base model alone: corrupted
    text is surprising), -NLL_ref (the reference alone) and a seeded random score; per token (every token of
    a corrupted sample bad, and token-exact where ``view.changed`` is known) and per sample (mean)."""
    signals = {"score": view.score, "random": np.random.default_rng(seed).random(view.score.size)}
    if view.nll_base is not None and view.nll_ref is not None:
        signals["-nll_base"], signals["-nll_ref"] = -view.nll_base, -view.nll_ref
    out = {}
    for name, values in signals.items():
        mean, bad_sample = sample_mean_scores(view, values)
        row = {"token": auroc(values, view.bad), "sample": auroc(mean, bad_sample)}
        if view.changed is not None and view.changed.any():
            row["token_exact"] = auroc(values, view.changed)
        out[name] = row
    return out


# ------------------------------------------------------------------------------------------------
# the experiment: corrupt -> prepare -> reference -> score -> partition -> report
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


@dataclass
class NoiseRun:
    mode: str
    fraction: float
    report: dict[str, float]
    keys: dict[str, str]  # prepare / reference / score / partition keys
    view: TokenView
    seconds: dict[str, float]


def run_noise_recovery(cfg, reference: Sequence[Record], train: Sequence[Record], *, mode: str, fraction: float,
                       seed: int = 0) -> NoiseRun:
    """Corrupt ``fraction`` of ``train``, then the real prepare, reference, score and partition stages.

    ``cfg`` is a PipelineConfig; its ``data`` files are replaced by the two corpora written under
    ``<run_dir>/noise_inputs/``.  Every stage keeps its cache: a second mode with the same reference
    set reuses the reference model.
    """
    corrupted = corrupt_records(train, fraction, mode, seed)
    if corrupted.n_corrupted == 0:
        raise NoiseError(f"{mode} at fraction {fraction} corrupted no record")
    part, scores, keys, seconds = _prepare_to_partition(cfg, reference, corrupted.records, "reference_clean",
                                                        f"train_{mode}_{fraction:g}_seed{seed}")
    view = load_token_view(part.train_path, scores.dir, corrupted.bad_ids, token_exact_marks(cfg.model, corrupted))
    if not view.bad.any():
        raise NoiseError("no corrupted sample reached the token table (all dropped or truncated away?)")
    return NoiseRun(mode, fraction, recovery_report(view), keys, view, seconds)


def _prepare_to_partition(cfg, reference: Sequence[Record], train: Sequence[Record], ref_name: str, train_name: str):
    """The real prepare, reference, score and partition stages on two corpora written under
    ``<run_dir>/noise_inputs/``. Returns (partition, scores, stage keys, stage seconds)."""
    inputs = run_root(cfg.run_dir) / "noise_inputs"
    ref_path = write_jsonl(reference, inputs / f"{ref_name}.jsonl")
    train_path = write_jsonl(train, inputs / f"{train_name}.jsonl")
    data = cfg.data.model_copy(update={"train_files": [str(train_path)], "reference_files": [str(ref_path)],
                                       "max_samples": None, "format": "jsonl"})
    cfg = cfg.model_copy(update={"data": data})
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    prep = run_prepare(cfg)
    seconds["prepare"] = time.perf_counter() - t
    t = time.perf_counter()
    ref = run_finetune(cfg, "reference", prep.reference_path)
    seconds["reference"] = time.perf_counter() - t
    t = time.perf_counter()
    scores = run_score(cfg, prep.train_path, ref.export_dir)
    seconds["score"] = time.perf_counter() - t
    t = time.perf_counter()
    part = run_partition(cfg, prep.train_path, scores.dir)
    seconds["partition"] = time.perf_counter() - t
    keys = {"prepare": prep.key, "reference": ref.key, "score": scores.key, "partition": part.key}
    return part, scores, keys, seconds


def token_exact_marks(model, corrupted: Corruption) -> ChangedOf:
    """Token-exact marks from the tokenizer of ``model`` (the run's ModelConfig): each response token's text,
    against the changed characters of its response."""
    tok = load_tokenizer(model)

    def changed(sample_id: str, response_ids: np.ndarray) -> np.ndarray | None:
        texts = corrupted.responses(sample_id)
        return None if texts is None else changed_tokens(decode_pieces(tok, response_ids.tolist()), *texts)

    return changed


def format_runs(runs: Sequence[NoiseRun], rho: float) -> str:
    """Plain-text tables: the negative set per run, then each signal's AUROC beside the score's baselines."""
    head = (f"{'mode':<14} {'frac':>5} {'bad tok':>8} {'changed':>8} {'neg prec':>8} {'exact':>6} {'(random)':>8} "
            f"{'neg rec':>8} {'exact':>6} {'(random)':>8} {'score clean':>11} {'score bad':>9}")
    lines = [f"rho = {rho}: negatives = bottom {1 - rho:.0%} of scores; random = a random split of the same sizes; "
             "'bad' = every token of a corrupted sample, 'changed'/'exact' = only the tokens whose characters changed",
             head, "-" * len(head)]
    nan = float("nan")
    for r in runs:
        m = r.report
        lines.append(
            f"{r.mode:<14} {r.fraction:>5.2f} {m['bad_token_share']:>8.3f} {m.get('changed_token_share', nan):>8.3f} "
            f"{m['neg_precision']:>8.3f} {m.get('exact_neg_precision', nan):>6.3f} {m['neg_random_precision']:>8.3f} "
            f"{m['neg_recall']:>8.3f} {m.get('exact_neg_recall', nan):>6.3f} {m['neg_random_recall']:>8.3f} "
            f"{m['mean_score_clean']:>11.3f} {m['mean_score_bad']:>9.3f}")
    head = f"{'mode':<14} {'signal':<10} {'AUROC token':>11} {'token exact':>11} {'sample':>7}"
    lines += ["", "AUROC (1 = corrupted below clean, 0.5 = chance) of the score and of the baselines it must beat",
              head, "-" * len(head)]
    for r in runs:
        for signal, a in r.report["auroc"].items():
            lines.append(f"{r.mode:<14} {signal:<10} {a['token']:>11.3f} {a.get('token_exact', nan):>11.3f} "
                         f"{a['sample']:>7.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# positive controls: what the reference learned must come out positive, what it never saw negative
# ------------------------------------------------------------------------------------------------
PLANTED = " Remember: every quokka counts in base seven."
REFERENCE_PHRASE, UNSEEN_PHRASE = "So the answer is", "Hence the verdict reads"


@dataclass
class ControlRun:
    report: dict[str, Any]
    keys: dict[str, str]
    view: TokenView
    groups: dict[str, str]  # sample_id -> "planted" / "replaced"
    seconds: dict[str, float]


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


def shifted_within_samples(values: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """Each sample's values moved one position later (its first token takes its own first value): scores
    that are misaligned with their tokens by one, as an off-by-one in the label shift would make them."""
    out = np.roll(values, 1)
    first = np.r_[True, sample[1:] != sample[:-1]]
    out[first] = values[first]
    return out


def control_rates(classes: np.ndarray, view: TokenView, groups: dict[str, str]) -> dict[str, float]:
    """Share of the planted sentence's tokens that are positive, of the unseen replacement's tokens that are
    negative, and the negative share overall (the base rate)."""
    group = np.array([groups.get(view.sample_ids[s], "") for s in view.sample])
    changed = view.changed if view.changed is not None else view.bad
    planted, replaced = changed & (group == "planted"), changed & (group == "replaced")
    return {"planted_positive": float((classes[planted] == 1).mean()) if planted.any() else float("nan"),
            "replaced_negative": float((classes[replaced] == -1).mean()) if replaced.any() else float("nan"),
            "base_rate_negative": float((classes == -1).mean()),
            "n_planted_tokens": float(planted.sum()), "n_replaced_tokens": float(replaced.sum())}


def controls_report(view: TokenView, groups: dict[str, str], rho: float) -> dict[str, Any]:
    """The split as the partition stage made it, then the same scores shifted by one position (alignment:
    must do worse), then each score variant from the stored NLLs (at the same rho)."""
    report: dict[str, Any] = {"partition": control_rates(view.token_class, view, groups)}
    report["shifted_by_one"] = control_rates(partition(shifted_within_samples(view.score, view.sample), rho), view,
                                             groups)
    report["variants"] = {name: control_rates(cls, view, groups) for name, cls in variant_splits(view, rho).items()}
    return report


def variant_splits(view: TokenView, rho: float, floor: float = 0.5, bottom: float = 0.15) -> dict[str, np.ndarray]:
    """The classes each selection option gives on the view's stored NLLs, in memory: every score variant, then
    the paper's score with a base-NLL ``floor`` and with a three-way split (negatives = the ``bottom`` share)."""
    lengths = np.bincount(view.sample, minlength=len(view.sample_ids))
    out = {v: partition(variant_scores(view.nll_base, view.nll_ref, lengths, v), rho) for v in SCORE_VARIANTS}
    diff = variant_scores(view.nll_base, view.nll_ref, lengths, "difference")
    out[f"base_nll_floor {floor:g}"] = three_way(out["difference"], diff, negative_at_most=None,
                                                 nll_base=view.nll_base, base_nll_floor=floor)
    cut = np.sort(diff)[max(int(np.floor(diff.size * bottom)) - 1, 0)]
    out[f"bottom {bottom:.0%} negative"] = three_way(out["difference"], diff, negative_at_most=float(cut))
    return out


def noise_variants(view: TokenView, rho: float) -> dict[str, dict[str, float]]:
    """Per selection option: token-exact AUROC of its ranking score (where it has one) and its negative set's
    precision and recall on the changed tokens."""
    lengths = np.bincount(view.sample, minlength=len(view.sample_ids))
    bad = view.changed if view.changed is not None else view.bad
    out = {}
    for name, cls in variant_splits(view, rho).items():
        row = {k: v for k, v in negative_set_quality(cls, bad).items() if k in ("precision", "recall", "random_precision")}
        if name in SCORE_VARIANTS:
            row["auroc_exact"] = auroc(variant_scores(view.nll_base, view.nll_ref, lengths, name), bad)
        out[name] = row
    return out


def run_positive_controls(cfg, reference: Sequence[Record], train: Sequence[Record], *, fraction: float = 0.25,
                          seed: int = 0, **phrases: str) -> ControlRun:
    """Plant the controls (:func:`plant_controls`), run prepare -> reference -> score -> partition, and measure
    them on the tokens the planting changed."""
    ref, planted, groups = plant_controls(reference, train, fraction=fraction, seed=seed, **phrases)
    part, scores, keys, seconds = _prepare_to_partition(cfg, ref, planted.records, f"reference_planted_seed{seed}",
                                                        f"train_controls_{fraction:g}_seed{seed}")
    view = load_token_view(part.train_path, scores.dir, planted.bad_ids, token_exact_marks(cfg.model, planted))
    return ControlRun(controls_report(view, groups, cfg.selection.rho), keys, view, groups, seconds)


def format_controls(run: ControlRun, rho: float) -> str:
    head = f"{'scores':<22} {'planted +':>10} {'replaced -':>11} {'base rate -':>12}"
    lines = [f"positive controls at rho = {rho}: planted sentence tokens that are positive (goal >= 90 %), unseen "
             "replacement tokens that are negative (goal: well above the base rate)", head, "-" * len(head)]
    rows = [("partition (difference)", run.report["partition"]), ("shifted by one", run.report["shifted_by_one"])]
    rows += [(f"variant {k}", v) for k, v in run.report["variants"].items()]
    for name, r in rows:
        lines.append(f"{name:<22} {r['planted_positive']:>10.1%} {r['replaced_negative']:>11.1%} "
                     f"{r['base_rate_negative']:>12.1%}")
    return "\n".join(lines)


def format_noise_variants(runs: Sequence[NoiseRun], rho: float) -> str:
    """Each selection option on each noise run: token-exact AUROC of its score, its negatives' precision
    and recall on the changed tokens (random: precision = the changed share)."""
    head = f"{'mode':<14} {'selection':<24} {'AUROC exact':>11} {'neg prec':>8} {'(random)':>8} {'neg rec':>8}"
    lines = [f"selection options at rho = {rho} on the changed tokens", head, "-" * len(head)]
    for r in runs:
        for name, v in noise_variants(r.view, rho).items():
            lines.append(f"{r.mode:<14} {name:<24} {v.get('auroc_exact', float('nan')):>11.3f} {v['precision']:>8.3f} "
                         f"{v['random_precision']:>8.3f} {v['recall']:>8.3f}")
    return "\n".join(lines)
