"""The study's measures (forgetting_ray.studies.metrics) on hand-made scores and token views."""

from __future__ import annotations

import numpy as np
import pytest

from forgetting_ray.studies.errors import NoiseError
from forgetting_ray.studies.metrics import (
    auroc,
    control_rates,
    negative_set_quality,
    recovery_report,
    sample_mean_scores,
    shifted_within_samples,
)
from forgetting_ray.studies.token_view import TokenView


# ------------------------------------------------------------------------------------------------
# auroc
# ------------------------------------------------------------------------------------------------
def test_auroc_perfect_chance_and_sign_flip():
    s = np.array([5.0, 4.0, 3.0, 0.0, -1.0])
    bad = np.array([False, False, False, True, True])
    assert auroc(s, bad) == 1.0
    assert auroc(-s, bad) == 0.0
    assert auroc(np.zeros(5), bad) == 0.5  # all ties: no information


def test_auroc_matches_pair_count_with_ties():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, size=60).astype(float)  # many ties
    bad = rng.random(60) < 0.3
    clean, b = s[~bad], s[bad]
    pairs = (clean[:, None] > b[None, :]).sum() + 0.5 * (clean[:, None] == b[None, :]).sum()
    assert auroc(s, bad) == pytest.approx(pairs / (clean.size * b.size))
    assert auroc(s, bad) + auroc(-s, bad) == pytest.approx(1.0)


def test_auroc_rejects_one_class_and_bad_values():
    with pytest.raises(NoiseError, match="both classes"):
        auroc(np.ones(3), np.zeros(3, bool))
    with pytest.raises(NoiseError, match="NaN"):
        auroc(np.array([1.0, np.nan]), np.array([True, False]))
    with pytest.raises(NoiseError, match="shape"):
        auroc(np.ones(3), np.ones(2, bool))


# ------------------------------------------------------------------------------------------------
# negative set
# ------------------------------------------------------------------------------------------------
def test_negative_set_precision_recall():
    cls = np.array([1, 1, 1, -1, -1, 1, -1, 1])
    bad = np.array([0, 0, 0, 1, 1, 1, 0, 0], bool)
    q = negative_set_quality(cls, bad)
    assert q["precision"] == pytest.approx(2 / 3)  # 2 of the 3 negatives are bad
    assert q["recall"] == pytest.approx(2 / 3)  # 2 of the 3 bad tokens are negative
    assert q["f1"] == pytest.approx(2 / 3)
    assert q["random_precision"] == pytest.approx(3 / 8) and q["random_recall"] == pytest.approx(3 / 8)
    assert q["n_negative"] == 3 and q["n_bad"] == 3 and q["n_tokens"] == 8


# ------------------------------------------------------------------------------------------------
# report over a token view
# ------------------------------------------------------------------------------------------------
def hand_made_view(**extra) -> TokenView:
    """Sample 0 clean (3 tokens), sample 1 bad (2 tokens), sample 2 clean (2 tokens)."""
    return TokenView(score=np.array([2.0, 1.0, 0.5, -1.0, 0.7, 3.0, 0.0], np.float32),
                     token_class=np.array([1, 1, -1, -1, 1, 1, -1], np.int8),
                     bad=np.array([0, 0, 0, 1, 1, 0, 0], bool), sample=np.array([0, 0, 0, 1, 1, 2, 2]),
                     sample_ids=["a", "b", "c"], **extra)


def test_recovery_report_on_a_hand_made_view():
    view = hand_made_view()
    mean, bad = sample_mean_scores(view)
    np.testing.assert_allclose(mean, [3.5 / 3, -0.15, 1.5], rtol=1e-6)
    assert bad.tolist() == [False, True, False]
    r = recovery_report(view)
    # clean scores {2, 1, .5, 3, 0} vs bad {-1, .7}: 5 + 3 = 8 of 10 pairs ordered right
    assert r["token_auroc"] == pytest.approx(0.8)
    assert r["sample_auroc"] == 1.0
    assert r["neg_precision"] == pytest.approx(1 / 3) and r["neg_recall"] == pytest.approx(1 / 2)
    assert r["bad_token_share"] == pytest.approx(2 / 7)


def test_signal_aurocs_put_the_score_beside_its_baselines():
    view = hand_made_view(
        changed=np.array([0, 0, 0, 1, 0, 0, 0], bool),  # only the first token of "b" changed
        nll_base=np.array([1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0], np.float32),
        nll_ref=np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], np.float32),
    )
    r = recovery_report(view)
    a = r["auroc"]
    assert a["score"]["token"] == pytest.approx(0.8) and a["score"]["token_exact"] == 1.0  # -1.0 is the lowest
    assert a["-nll_base"]["token_exact"] == 1.0 and a["-nll_base"]["token"] == pytest.approx(0.75)
    assert a["-nll_ref"]["token_exact"] == 0.5
    assert set(a) == {"score", "random", "-nll_base", "-nll_ref"} and 0 <= a["random"]["token"] <= 1
    assert r["changed_token_share"] == pytest.approx(1 / 7) and r["changed_share_of_bad_samples"] == 0.5
    assert r["exact_neg_recall"] == 1.0 and r["exact_neg_precision"] == pytest.approx(1 / 3)


def test_shifted_scores_and_control_rates():
    sample = np.array([0, 0, 0, 1, 1])
    np.testing.assert_array_equal(shifted_within_samples(np.array([1., 2., 3., 4., 5.]), sample), [1, 1, 2, 4, 4])
    view = TokenView(score=np.zeros(5, np.float32), token_class=np.array([1, 1, -1, -1, 1], np.int8),
                     bad=np.array([0, 1, 1, 1, 1], bool), sample=sample, sample_ids=["p", "r"],
                     changed=np.array([0, 1, 1, 1, 0], bool))
    r = control_rates(view.token_class, view, {"p": "planted", "r": "replaced"})
    assert r["planted_positive"] == 0.5 and r["replaced_negative"] == 1.0 and r["base_rate_negative"] == 0.4
