"""Controlled noise through the real stages: the negative class must find corrupted responses.

A random tiny Llama is the base model; the reference model is that model trained from scratch (all
weights, 150 small steps) on clean FLAN CoT records.  Its NLL falls on text that looks like
the clean corpus, so on training samples whose letters were scrambled (``shuffle_chars``) the
score NLL_base - NLL_ref stays low.  A broken pipeline -- scores misaligned with tokens, a sign
flip, random scores -- lands at or below 0.5 and fails the margins below.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO, tiny_reference_config

from forgetting_ray.data.readers import read_records
from forgetting_ray.studies.corruption import split_reference
from forgetting_ray.studies.experiments import run_noise_recovery
from forgetting_ray.studies.metrics import auroc, negative_set_quality

FRACTION = 0.3
N_TRAIN = 100


@pytest.fixture(scope="module")
def run(ray_cluster, tiny_llama, tmp_path_factory):
    cfg = tiny_reference_config(tmp_path_factory.mktemp("noise"), tiny_llama)
    records = list(read_records(sorted((REPO / "examples/data/flan_v2_cot").glob("*.tsv")), cfg.data))
    reference, train = split_reference(records, 240, N_TRAIN, seed=0)
    return run_noise_recovery(cfg, reference, train, mode="shuffle_chars", fraction=FRACTION, seed=0)


def test_corrupted_samples_are_the_bad_tokens(run):
    v = run.view
    assert len(v.sample_ids) == N_TRAIN and run.report["n_bad_samples"] == round(FRACTION * N_TRAIN)
    assert v.score.shape == v.token_class.shape == v.bad.shape
    # every token of a sample carries the sample's label
    for s in np.unique(v.sample):
        assert len(set(v.bad[v.sample == s].tolist())) == 1
    # token-exact: only tokens of corrupted samples can have changed; scrambled letters change most words but
    # not the short ones, digits or the end-of-turn token
    assert v.changed is not None and not (v.changed & ~v.bad).any()
    assert 0.5 < run.report["changed_share_of_bad_samples"] < 1.0, run.report


def test_scores_rank_corrupted_tokens_low(run):
    v, r = run.view, run.report
    # Measured on this setting: token AUROC 0.62, sample AUROC 0.89.  Under the null (scores unrelated
    # to corruption) the token AUROC over ~7k tokens has a standard deviation below 0.01.
    assert r["token_auroc"] > 0.58, r
    assert r["sample_auroc"] > 0.8, r
    assert r["mean_score_bad"] < r["mean_score_clean"]
    # the same metric on a broken pipeline's scores fails the margins above
    assert auroc(-v.score, v.bad) < 0.42  # sign flip
    shuffled = np.random.default_rng(0).permutation(v.score)  # scores detached from their tokens
    assert abs(auroc(shuffled, v.bad) - 0.5) < 0.05
    # the baselines beside it: random at chance; the report holds each signal per token, token-exact, sample
    a = r["auroc"]
    assert abs(a["random"]["token"] - 0.5) < 0.05 and set(a["score"]) == {"token", "token_exact", "sample"}
    assert a["score"]["token_exact"] > 0.58, a


def test_negative_class_holds_the_corruption(run):
    r = run.report
    # measured: precision 0.44 vs 0.33 at random, recall 0.40 vs 0.30
    assert r["neg_precision"] > 1.2 * r["neg_random_precision"], r
    assert r["neg_recall"] > 1.2 * r["neg_random_recall"], r
    # and the partition's classes are the scores' bottom 30%, not something else
    v = run.view
    flipped = negative_set_quality(-v.token_class, v.bad)
    assert flipped["precision"] < r["neg_random_precision"]
