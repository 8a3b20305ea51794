"""Positive controls through the real stages, on the tiny model: a sentence the reference corpus teaches (the
base never saw it) planted into a quarter of the training responses must come out positive; an unseen
replacement for the phrase every reference response uses must come out negative well above the base rate;
and the same scores shifted by one position within each sample must do worse (a token/score misalignment
would).  The reference is the tiny random Llama trained on all weights; measured figures are in the asserts.
"""

from __future__ import annotations

import pytest
from conftest import REPO, tiny_reference_config

from forgetting_ray.data.readers import read_records
from forgetting_ray.studies.corruption import split_reference
from forgetting_ray.studies.experiments import run_positive_controls
from forgetting_ray.studies.tables import controls_table


@pytest.fixture(scope="module")
def controls(ray_cluster, tiny_llama, tmp_path_factory):
    cfg = tiny_reference_config(tmp_path_factory.mktemp("controls"), tiny_llama, max_length=320)
    records = list(read_records(sorted((REPO / "examples/data/flan_v2_cot").glob("*.tsv")), cfg.data))
    reference, train = split_reference(records, 240, 160, seed=0)
    run = run_positive_controls(cfg, reference, train, fraction=0.25, seed=0)
    print(controls_table(run.report))
    return run


def test_what_the_reference_learned_comes_out_positive(controls):
    r = controls.report["partition"]
    assert r["n_planted_tokens"] > 100 and r["planted_positive"] >= 0.9, r


def test_an_unseen_replacement_comes_out_negative_above_the_base_rate(controls):
    r = controls.report["partition"]
    assert r["n_replaced_tokens"] > 50 and abs(r["base_rate_negative"] - 0.3) < 0.01
    assert r["replaced_negative"] > 1.4 * r["base_rate_negative"], r


def test_scores_shifted_by_one_position_do_worse(controls):
    aligned, shifted = controls.report["partition"], controls.report["shifted_by_one"]
    assert shifted["replaced_negative"] < aligned["replaced_negative"] - 0.05, (aligned, shifted)
    assert shifted["planted_positive"] <= aligned["planted_positive"], (aligned, shifted)
