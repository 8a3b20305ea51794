"""Exact, deterministic global top-rho partition of response-token scores (docs/method.md §5).

Exactly ``k = floor(N * rho)`` tokens with the highest scores are positive (+1), all others
negative (-1); among equal scores the lower global index wins.  ``partition`` works on one
in-memory array in O(N); ``partition_shards`` gives the identical answer for score sets that do
not fit in memory, from three streaming passes (radix select on the float32 bit pattern).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterable, Iterator

import numpy as np

POSITIVE, NEGATIVE, IGNORED = 1, -1, 0


def _check_rho(rho: float) -> None:
    if not (0.0 < rho <= 1.0):  # NaN fails too
        raise ValueError(f"rho must be in (0, 1], got {rho}")


def num_positive(n: int, rho: float) -> int:
    _check_rho(rho)
    # exact decimal arithmetic: floor(100 * 0.29) is 29, although 100 * 0.29 == 28.999999999999996
    return math.floor(Fraction(repr(float(rho))) * n)


def _as_scores(scores: np.ndarray, where: str = "") -> np.ndarray:
    s = np.asarray(scores, dtype=np.float32)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    bad = ~np.isfinite(s)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"non-finite score {s[i]} at index {i}{where}")
    return s + np.float32(0.0)  # -0.0 -> +0.0 so that equal scores compare and hash equal


def partition(scores: np.ndarray, rho: float) -> np.ndarray:
    """int8 classes aligned with ``scores``: +1 for the floor(N*rho) highest, -1 for the rest."""
    s = _as_scores(scores)
    n = s.size
    if n == 0:
        raise ValueError("no scores to partition (empty corpus?)")
    k = num_positive(n, rho)
    out = np.full(n, NEGATIVE, dtype=np.int8)
    if k == 0:
        return out
    tau = np.partition(s, n - k)[n - k]  # the k-th largest score
    out[s > tau] = POSITIVE
    ties = np.flatnonzero(s == tau)
    out[ties[: k - int((s > tau).sum())]] = POSITIVE
    return out


# ----------------------------------------------------------------------------------------------
# sharded (out-of-core) version
# ----------------------------------------------------------------------------------------------
def _sortable_keys(s: np.ndarray) -> np.ndarray:
    """uint32 keys whose unsigned order equals the float32 order of ``s`` (finite values)."""
    bits = s.view(np.uint32)
    negative = (bits >> 31).astype(bool)
    return np.where(negative, ~bits, bits | np.uint32(0x80000000))


def _key_to_float(key: int) -> float:
    bits = (key & 0x7FFFFFFF) if key & 0x80000000 else (~key & 0xFFFFFFFF)
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


@dataclass(frozen=True)
class Threshold:
    n: int  # response tokens in the corpus
    k: int  # positives = floor(n * rho)
    tau: float  # the k-th largest score (tokens above are positive; ties go by index)
    n_above: int  # tokens strictly above tau
    ties_positive: int  # how many tokens equal to tau, first by index, are positive


def find_threshold(shards: Callable[[], Iterable[np.ndarray]], rho: float) -> Threshold:
    """Exact global k-th largest score from repeated passes over ``shards()``.

    Pass 1 counts and histograms the top 16 bits of the sortable key, pass 2 the low 16 bits inside
    the bin that holds the k-th value; a third pass (in ``partition_shards``) writes the classes.
    """
    _check_rho(rho)
    hi = np.zeros(1 << 16, dtype=np.int64)
    n = 0
    for i, shard in enumerate(shards()):
        s = _as_scores(shard, f" of shard {i}")
        n += s.size
        hi += np.bincount((_sortable_keys(s) >> 16).astype(np.int64), minlength=1 << 16)
    if n == 0:
        raise ValueError("no scores to partition (empty corpus?)")
    k = num_positive(n, rho)
    if k == 0:
        return Threshold(n=n, k=0, tau=math.inf, n_above=0, ties_positive=0)
    above_hi = np.cumsum(hi[::-1])[::-1]  # above_hi[b] = tokens with high bits >= b
    b = int(np.flatnonzero(above_hi >= k)[-1])
    before = int(above_hi[b + 1]) if b + 1 < hi.size else 0  # strictly higher bins
    lo = np.zeros(1 << 16, dtype=np.int64)
    for shard in shards():
        keys = _sortable_keys(_as_scores(shard))
        inside = keys[(keys >> 16) == b]
        lo += np.bincount((inside & 0xFFFF).astype(np.int64), minlength=1 << 16)
    above_lo = np.cumsum(lo[::-1])[::-1]
    c = int(np.flatnonzero(before + above_lo >= k)[-1])
    n_above = before + (int(above_lo[c + 1]) if c + 1 < lo.size else 0)
    tau = _key_to_float((b << 16) | c)
    return Threshold(n=n, k=k, tau=tau, n_above=n_above, ties_positive=k - n_above)


def partition_shards(shards: Callable[[], Iterable[np.ndarray]], rho: float) -> Iterator[np.ndarray]:
    """Yield int8 classes per shard, identical to ``partition(np.concatenate(shards), rho)``."""
    th = find_threshold(shards, rho)
    ties_left = th.ties_positive
    for shard in shards():
        out, ties_left = classify_shard(_as_scores(shard), np.float32(th.tau), ties_left)
        yield out


def classify_shard(scores: np.ndarray, tau: np.float32, ties_left: int) -> tuple[np.ndarray, int]:
    """One shard's classes under the global threshold, shards taken in order: scores above ``tau`` are
    positive, and so are the first ``ties_left`` scores equal to it (the lower global index wins).
    Returns the classes and the ties still to be made positive in later shards."""
    out = np.where(scores > tau, POSITIVE, NEGATIVE).astype(np.int8)
    if ties_left > 0:
        ties = np.flatnonzero(scores == tau)[:ties_left]
        out[ties] = POSITIVE
        ties_left -= ties.size
    return out, ties_left


# ----------------------------------------------------------------------------------------------
# score variants and the three-way split (beyond the paper; the default stays its `difference`)
# ----------------------------------------------------------------------------------------------
SCORE_VARIANTS = ("difference", "relative", "prob_gain", "zscore")
_TINY = 1e-6


def variant_scores(nll_base: np.ndarray, nll_ref: np.ndarray, lengths: np.ndarray, variant: str) -> np.ndarray:
    """float32 scores of one shard's response tokens (rows laid end to end, ``lengths`` tokens each):

    * ``difference``: l_base - l_ref (the paper);
    * ``relative``: (l_base - l_ref) / l_base, the share of the base model's loss the reference removed;
    * ``prob_gain``: p_ref - p_base, the probability the reference added (bounded, so confident tokens
      the reference merely sharpened cannot dominate);
    * ``zscore``: the difference standardised within its sequence (a sample the reference found easy as
      a whole does not take all the positives).
    """
    b = np.asarray(nll_base, dtype=np.float64)
    r = np.asarray(nll_ref, dtype=np.float64)
    if variant == "difference":
        out = b - r
    elif variant == "relative":
        out = (b - r) / np.maximum(b, _TINY)
    elif variant == "prob_gain":
        out = np.exp(-r) - np.exp(-b)
    elif variant == "zscore":
        d = b - r
        lengths = np.asarray(lengths, dtype=np.int64)
        row = np.repeat(np.arange(lengths.size), lengths)
        n = np.maximum(lengths, 1)
        mean = np.bincount(row, d, minlength=lengths.size) / n
        var = np.bincount(row, (d - mean[row]) ** 2, minlength=lengths.size) / n
        out = (d - mean[row]) / np.sqrt(var[row] + _TINY)  # one-token sequences score 0
    else:
        raise ValueError(f"unknown score variant {variant!r}; choose one of {', '.join(SCORE_VARIANTS)}")
    return out.astype(np.float32)


def three_way(classes: np.ndarray, scores: np.ndarray, *, negative_at_most: float | None,
              nll_base: np.ndarray | None = None, base_nll_floor: float | None = None) -> np.ndarray:
    """Classes after the options that leave tokens out (class 0, ignored by the loss):

    * ``negative_at_most``: only negatives scoring at most this stay negative; the middle band between it and
      the positives is ignored (a margin below the threshold, or the score that closes the bottom fraction);
    * ``base_nll_floor``: a negative the base model already predicts well (l_base below the floor) is
      ignored: ascending the loss of format and end-of-turn tokens breaks the model's output.
    Positives never change, so the count floor(N * rho) holds."""
    out = classes.copy()
    neg = out == NEGATIVE
    if negative_at_most is not None:
        out[neg & ~(scores <= negative_at_most)] = IGNORED
    if base_nll_floor is not None:
        if nll_base is None:
            raise ValueError("base_nll_floor needs nll_base")
        out[(out == NEGATIVE) & (np.asarray(nll_base) < base_nll_floor)] = IGNORED
    return out


def bottom_threshold(shards: Callable[[], Iterable[np.ndarray]], fraction: float) -> float:
    """The floor(N * fraction)-th smallest score (exact, streaming): the tokens scoring at most it are the
    bottom ``fraction`` (more only where scores tie with it)."""
    th = find_threshold(lambda: (-np.asarray(s, dtype=np.float32) for s in shards()), fraction)
    return -th.tau if np.isfinite(th.tau) else -math.inf
