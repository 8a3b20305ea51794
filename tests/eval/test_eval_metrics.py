"""Eval metrics on hand-made cases with known answers, and the subset rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from forgetting_ray.eval import metrics as M
from forgetting_ray.eval.base import select_indices
from forgetting_ray.eval.runner import format_table, headline_scores


def test_mc_acc_and_argmax_ties():
    assert M.mc_acc([-3.0, -1.0, -2.0], 1) == 1.0
    assert M.mc_acc([-3.0, -1.0, -2.0], 0) == 0.0
    assert M.mc_acc([-1.0, -1.0], 0) == 1.0  # np.argmax: first of equal maxima


def test_acc_norm_divides_by_choice_characters():
    # raw: choice 1 wins (-4 > -6); per character: -6/12 = -0.5 beats -4/2 = -2
    lls, choices = [-6.0, -4.0], ["twelve chars", "ab"]
    assert M.mc_acc([-6.0, -4.0], 0) == 0.0
    assert M.mc_acc_norm(lls, choices, 0) == 1.0


def test_mc2_normalised_mass_on_true_answers():
    lls = np.log([0.2, 0.1, 0.3, 0.4])
    assert M.mc2(lls, [1, 1, 0, 0]) == pytest.approx(0.3 / 1.0)
    # unnormalised probabilities: only the ratio matters
    assert M.mc2(np.log([0.02, 0.01, 0.03]), [1, 0, 0]) == pytest.approx(1 / 3)
    assert M.mc2([0.0], [1]) == 1.0


def test_mc2_survives_underflow():
    # exp(-1000) is 0.0 in float64: the naive formula gives 0/0
    assert M.mc2([-1000.0, -1000.0 - math.log(3)], [1, 0]) == pytest.approx(0.75)


def test_mc2_matches_lm_eval_process_results():
    utils = pytest.importorskip("lm_eval.tasks.truthfulqa.utils")
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 10))
        lls = rng.normal(-20, 5, size=n)
        labels = [1] * int(rng.integers(1, n)) + [0]
        labels = labels + [0] * (n - len(labels))
        doc = {"mc2_targets": {"labels": labels}}
        theirs = utils.process_results_mc2(doc, [(ll, False) for ll in lls])["acc"]
        assert M.mc2(lls, labels) == pytest.approx(theirs, rel=1e-9)


def test_mc2_rejects_bad_labels():
    with pytest.raises(ValueError):
        M.mc2([-1.0, -2.0], [0, 0])
    with pytest.raises(ValueError):
        M.mc2([-1.0, -2.0], [1])


def test_squad_normalisation():
    assert M.normalize_answer("The  Cat, sat!") == "cat sat"
    assert M.normalize_answer("An apple a day") == "apple day"
    assert M.normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert M.normalize_answer("  MIXED\tCase\n") == "mixed case"


def test_squad_em_and_f1():
    assert M.squad_em("the Eiffel Tower.", ["Eiffel Tower"]) == 1.0
    assert M.squad_em("Eiffel", ["Eiffel Tower"]) == 0.0
    # pred "cat sat" vs gold "cat sat down": P = 2/2, R = 2/3, F1 = 0.8
    assert M.squad_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    # repeated tokens count by multiplicity: one "x" and one "y" in common of 3 and 3
    assert M.squad_f1("x x y", ["x y y"]) == pytest.approx(2 / 3)
    # max over gold answers
    assert M.squad_f1("Paris", ["London", "Paris France"]) == pytest.approx(2 / 3)
    assert M.squad_f1("", ["Paris"]) == 0.0
    assert M.squad_f1("Paris", []) == 0.0


def test_clean_generation_cuts_at_first_stop():
    assert M.clean_generation(" 42 apples\nQuestion: next") == "42 apples"
    assert M.clean_generation("\n\nlater") == "later"  # stripped first, as open-instruct does


def test_asdiv_target_and_match():
    assert M.asdiv_target("9 (apples)") == "9"
    assert M.asdiv_target("7 (dogs); 3 (cats)") == "7"  # lm-eval's rule, kept
    assert M.asdiv_match("9", "9 (apples)") == (1.0, True)
    assert M.asdiv_match("9 apples.", "9 (apples)") == (1.0, True)
    assert M.asdiv_match("1,200", "1200 (dollars)") == (1.0, True)
    assert M.asdiv_match("0.5", "1/2 (cup)") == (1.0, True)  # numbers compare by value
    assert M.parse_number("1/2") == 0.5
    assert M.asdiv_match("8", "9 (apples)") == (0.0, True)
    assert M.asdiv_match("26 - 8 = 18 years", "26 (years)") == (0.0, True)  # equation: its result counts
    assert M.asdiv_match("7 + 2 = 9", "9 (apples)") == (1.0, True)
    assert M.asdiv_match("7 + 2", "9 (apples)") == (0.0, False)
    assert M.asdiv_match("nine", "9 (apples)") == (0.0, False)  # unparsable: wrong, and flagged
    assert M.asdiv_match("", "9 (apples)") == (0.0, False)
    assert M.asdiv_match("2:3", "2:3") == (1.0, True)  # non-numeric gold: string match
    assert M.asdiv_match("East.", "east") == (1.0, True)


def test_select_indices_fraction_count_random():
    assert len(select_indices(817, 0.99)) == math.ceil(0.99 * 817) == 809
    assert select_indices(817, 0.99)[:3] == [0, 1, 2]
    assert select_indices(10, 3) == [0, 1, 2]
    assert select_indices(10, None) == list(range(10))
    assert select_indices(5, 50) == list(range(5))
    a, b = select_indices(100, 10, "random", 42), select_indices(100, 10, "random", 42)
    assert a == b and a == sorted(a) and len(set(a)) == 10 and a != list(range(10))
    assert select_indices(100, 10, "random", 43) != a
    with pytest.raises(ValueError):
        select_indices(10, 1.5)
    with pytest.raises(ValueError):
        select_indices(10, 2, "shuffle")


def test_headline_average_and_table():
    metrics = {
        "truthfulqa": {"mc1": 0.2, "mc2": 0.4, "n": 10.0},
        "boolq": {"acc": 0.6, "n": 10.0},
        "logiqa": {"acc": 0.3, "acc_norm": 0.25, "n": 10.0},
        "tydiqa": {"f1": 0.1, "em": 0.0, "n": 10.0},
        "asdiv": {"acc": 0.1, "n_unparsable": 3.0, "n": 10.0},
    }
    heads, avg = headline_scores(metrics)
    assert heads == {"truthfulqa": 0.4, "boolq": 0.6, "logiqa": 0.3, "tydiqa": 0.1, "asdiv": 0.1}
    assert avg == pytest.approx(0.3)
    table = format_table({"tasks": metrics, "average": avg})
    assert "mc2*" in table and "0.3000" in table and "n_unparsable" in table
    _, partial = headline_scores({"boolq": {"acc": 0.5}})
    assert partial is None
