"""The study's measures over a token view: AUROC, the negative set's precision and recall, the baselines a
score must beat, and the positive controls' rates; every selection option recomputed from the stored NLLs."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..selection import SCORE_VARIANTS, partition, three_way, variant_scores
from .errors import NoiseError
from .token_view import TokenView


# ------------------------------------------------------------------------------------------------
# ranking and the negative set
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
# the recovery of corrupted tokens
# ------------------------------------------------------------------------------------------------
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
# positive controls and the selection options
# ------------------------------------------------------------------------------------------------
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
