"""Per-example metrics of the five benchmarks, written to match lm-evaluation-harness and SQuAD v1.1.

Pure Python/numpy: every function here takes model outputs (log-likelihoods, generated text) and
gold answers and returns numbers, so each is unit-tested on hand-made cases.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Iterable, Sequence

import numpy as np


# --------------------------------------------------------------------------------------------
# multiple choice (lm-eval `multiple_choice` output type)
# --------------------------------------------------------------------------------------------
def mc_acc(lls: Sequence[float], gold: int) -> float:
    """1.0 when the highest log-likelihood choice is ``gold`` (ties go to the first, as np.argmax)."""
    return float(int(np.argmax(np.asarray(lls, dtype=np.float64))) == gold)


def mc_acc_norm(lls: Sequence[float], choices: Sequence[str], gold: int) -> float:
    """lm-eval's acc_norm: argmax of log-likelihood divided by the choice's length in characters.

    The length is that of the choice string itself, without the target delimiter (" ") that is
    prepended to the scored continuation (lm_eval/api/task.py, ``completion_len``).
    """
    lengths = np.array([float(len(c)) for c in choices])
    return float(int(np.argmax(np.asarray(lls, dtype=np.float64) / lengths)) == gold)


def mc2(lls: Sequence[float], labels: Sequence[int]) -> float:
    """TruthfulQA MC2: probability mass on the true answers, normalised over all answers.

    ``sum(p_true) / sum(p_all)`` with ``p = exp(total log-likelihood)``.  Computed with the
    log-sum-exp shift so long answers (log-likelihoods of -300 and below) do not underflow to 0/0;
    the shift cancels in the ratio, so the value equals lm-eval's ``process_results_mc2``.
    """
    ll = np.asarray(lls, dtype=np.float64)
    lab = np.asarray(labels)
    if ll.shape != lab.shape:
        raise ValueError(f"{ll.shape[0]} log-likelihoods but {lab.shape[0]} labels")
    if not (lab == 1).any():
        raise ValueError("mc2 needs at least one true answer (label 1)")
    p = np.exp(ll - ll.max())
    return float(p[lab == 1].sum() / p.sum())


# --------------------------------------------------------------------------------------------
# SQuAD v1.1 (TyDiQA GoldP): the official normalisation, EM and token F1
# --------------------------------------------------------------------------------------------
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """Lower case, drop ASCII punctuation, drop English articles, collapse whitespace (SQuAD v1.1)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def squad_em(prediction: str, golds: Iterable[str]) -> float:
    """Max over gold answers of normalised exact match."""
    p = normalize_answer(prediction)
    return max((float(p == normalize_answer(g)) for g in golds), default=0.0)


def _f1_one(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:  # also covers an empty prediction or gold (SQuAD v1.1 returns 0)
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, golds: Iterable[str]) -> float:
    """Max over gold answers of token-level F1 after normalisation."""
    return max((_f1_one(prediction, g) for g in golds), default=0.0)


def clean_generation(text: str, stop: Sequence[str] = ("\n",)) -> str:
    """Cut a generation at its first stop string and strip it (open-instruct's TyDiQA cleaning)."""
    text = text.strip()
    for s in stop:
        if s and s in text:
            text = text.split(s, 1)[0]
    return text.strip()


# --------------------------------------------------------------------------------------------
# ASDiv
# --------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"^[-+]?(\d[\d,]*\.?\d*|\.\d+)(\s*/\s*\d+)?")


def asdiv_target(answer: str) -> str:
    """Gold answer with its unit stripped, as lm-eval's asdiv ``doc_to_target``: ``answer.split(' (')[0]``."""
    return answer.split(" (")[0]


def parse_number(text: str) -> float | None:
    """The number at the start of ``text`` ("1,200", "3.5", "3/4", "-2"), else None."""
    m = _NUMBER.match(text.strip())
    if not m:
        return None
    whole = m.group(0).replace(",", "").replace(" ", "")
    try:
        if "/" in whole:
            num, den = whole.split("/")
            return float(num) / float(den) if float(den) != 0 else None
        return float(whole.rstrip("."))
    except ValueError:
        return None


def asdiv_match(prediction: str, answer: str) -> tuple[float, bool]:
    """Exact match of a greedy answer line against the unit-stripped gold; returns (score, parsable).

    Numeric golds (most problems) compare the leading number of the prediction with the gold's
    number, so "9 apples" or "9." match "9 (apples)" (an equation "7 + 2 = 9" counts by what follows
    its last "="); a prediction with no leading number is
    *unparsable* and scores 0.  Non-numeric golds ("2:3", "east", multi-valued "7 (dogs); 3 (cats)")
    compare whole strings, lower-cased with surrounding punctuation stripped.
    """
    target = asdiv_target(answer).strip()
    gold_num = parse_number(target) if _NUMBER.fullmatch(target.replace(" ", "")) else None
    pred = prediction.strip()
    if gold_num is not None:
        m = _NUMBER.match(pred)
        if m and pred[m.end():].lstrip()[:1] in set("+-*/×÷="):
            # "26 - 8 = 12" is working, not an answer: its answer is what follows the last "="
            pred = pred.rsplit("=", 1)[1] if "=" in pred else ""
        got = parse_number(pred)
        if got is None:
            return 0.0, False
        return float(math.isclose(got, gold_num, rel_tol=1e-9, abs_tol=1e-9)), True
    if not pred:
        return 0.0, False
    norm = lambda s: s.lower().strip().strip(".").strip()  # noqa: E731
    return float(norm(pred) == norm(target)), True


def mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")
