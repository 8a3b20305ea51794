"""`forgetting-ray reproduce`: the comparison of two run cards, and the refusals (the rerun itself is
exercised on the tiny pipeline in tests/integration/test_fresh_clone.py)."""

from __future__ import annotations

import json

import pytest

from forgetting_ray.reproduce import ReproduceError, changed_inputs, compare, format_comparison, read_card, reproduce


def card(**changes) -> dict:
    base = {
        "status": "FINISHED", "config": {"run_dir": "x"}, "until": None, "python": "3.11.9", "platform": "linux",
        "packages": {"torch": "2.13.0", "ray": "2.60.0"}, "seeds": {"seed": 42},
        "data": {"train_table": "t" * 64, "reference_table": "r" * 64},
        "models": {"base": {"path": "smollm2-135m"}, "reference": {"weights_sha256": "a" * 64},
                   "train": {"weights_sha256": "b" * 64}},
        "scores": {"key": "k1", "shards_sha256": "s" * 64, "n_response_tokens": 100},
        "stages": {"partition": {"key": "p1", "rho": 0.7, "threshold": -0.25},
                   "eval": {"forgetting": {"average": 21.1, "headline": {"boolq": 75.0}}}},
    }
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = base
        for p in parents:
            node = node[p]
        node[leaf] = value
    return base


def test_identical_cards_match_on_every_stage():
    checks = compare(card(), card())
    assert {c.stage for c in checks} == {"prepare", "reference", "score", "partition", "train", "eval"}
    assert all(c.matches for c in checks) and not changed_inputs(card(), card())
    assert "every one of the" in format_comparison("a", "b", checks, [])


def test_a_changed_output_and_a_changed_input_are_named():
    other = card(models__train={"weights_sha256": "c" * 64}, packages__torch="2.14.0",
                 stages__partition={"key": "p1", "rho": 0.7, "threshold": -0.26})
    checks = compare(card(), other)
    assert sorted(f"{c.stage}/{c.what}" for c in checks if not c.matches) == ["partition/partition.threshold",
                                                                              "train/train.weights"]
    assert changed_inputs(card(), other) == ["package torch: 2.13.0 -> 2.14.0"]
    text = format_comparison("a", "b", checks, changed_inputs(card(), other))
    assert "2 of" in text and "train/train.weights" in text and "torch: 2.13.0 -> 2.14.0" in text


def test_refusals_name_the_card(tmp_path):
    with pytest.raises(ReproduceError, match="no run card"):
        read_card(str(tmp_path))
    (tmp_path / "run_card.json").write_text(json.dumps(card(status="FAILED")))
    with pytest.raises(ReproduceError, match="did not finish"):
        read_card(str(tmp_path))
    (tmp_path / "run_card.json").write_text(json.dumps(card()))
    with pytest.raises(ReproduceError, match="already holds a run"):
        reproduce(str(tmp_path), str(tmp_path))
