"""Corruption and recovery maths of forgetting_ray.noise, on hand-made inputs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from forgetting_ray.config import DataConfig
from forgetting_ray.data.readers import Message, Record, read_records
from forgetting_ray.noise import (
    harmful_split,
    NoiseError,
    TokenView,
    auroc,
    corrupt_records,
    negative_set_quality,
    recovery_report,
    sample_mean_scores,
    write_jsonl,
)


def rec(i: int, response: str | None = None) -> Record:
    return Record("messages", (Message("user", f"question {i}?"),
                               Message("assistant", response or f"because reason number {i} holds. So the answer is {i}.")),
                  "src", f"f:{i}")


RECORDS = [rec(i) for i in range(20)]


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
# corruption
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["swap", "shuffle_words", "shuffle_chars"])
def test_corrupt_records_changes_exactly_the_chosen_responses(mode):
    c = corrupt_records(RECORDS, 0.25, mode, seed=3)
    assert c.n_corrupted == 5 and len(c.records) == 20
    for old, new, bad in zip(RECORDS, c.records, c.corrupted):
        assert new.messages[0] == old.messages[0]  # prompts untouched
        assert (new.messages[1].content != old.messages[1].content) == bad
        assert (new.sample_id != old.sample_id) == bad
    assert c.bad_ids == {r.sample_id for r, b in zip(c.records, c.corrupted) if b}
    again = corrupt_records(RECORDS, 0.25, mode, seed=3)
    assert again.records == c.records  # seeded
    assert corrupt_records(RECORDS, 0.25, mode, seed=4).corrupted != c.corrupted


def test_swap_is_a_derangement_of_the_chosen_responses():
    c = corrupt_records(RECORDS, 0.5, "swap", seed=0)
    chosen = [i for i, b in enumerate(c.corrupted) if b]
    before = sorted(RECORDS[i].messages[1].content for i in chosen)
    after = sorted(c.records[i].messages[1].content for i in chosen)
    assert before == after and len(chosen) == 10  # the same responses, each at another question


def test_shuffles_keep_the_words_or_letters():
    c = corrupt_records(RECORDS, 0.2, "shuffle_words", seed=1)
    for old, new, bad in zip(RECORDS, c.records, c.corrupted):
        if bad:
            assert sorted(new.messages[1].content.split()) == sorted(old.messages[1].content.split())
    c = corrupt_records(RECORDS, 0.2, "shuffle_chars", seed=1)
    for old, new, bad in zip(RECORDS, c.records, c.corrupted):
        if bad:
            for a, b in zip(old.messages[1].content.split(), new.messages[1].content.split()):
                assert sorted(a) == sorted(b) and a[0] == b[0] and a[-1] == b[-1]


def test_unchangeable_records_are_not_counted():
    same = [rec(i, "same answer here.") for i in range(4)]  # swapping identical responses changes nothing
    c = corrupt_records(same, 1.0, "swap", seed=0)
    assert c.n_corrupted == 0 and c.bad_ids == set()


def test_corrupt_rejects_bad_arguments():
    with pytest.raises(NoiseError, match="mode"):
        corrupt_records(RECORDS, 0.1, "reverse")
    with pytest.raises(NoiseError, match="fraction"):
        corrupt_records(RECORDS, 1.5, "swap")
    with pytest.raises(NoiseError, match="two"):
        corrupt_records(RECORDS, 0.05, "swap")  # one record cannot swap with itself


def test_written_corpus_reads_back_with_the_same_sample_ids(tmp_path):
    c = corrupt_records(RECORDS, 0.3, "shuffle_words", seed=0)
    path = write_jsonl(c.records, tmp_path / "noisy.jsonl")
    back = list(read_records([path], DataConfig()))
    assert [r.sample_id for r in back] == [r.sample_id for r in c.records]
    assert c.bad_ids <= {r.sample_id for r in back}


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


# ------------------------------------------------------------------------------------------------
# token-exact marks and the baselines
# ------------------------------------------------------------------------------------------------
def test_only_tokens_whose_characters_changed_count_as_corrupted(tiny_tokenizer_dir):
    from forgetting_ray.config import ModelConfig
    from forgetting_ray.models import load_tokenizer
    from forgetting_ray.noise import changed_tokens
    from forgetting_ray.report.html import decode_pieces

    tok = load_tokenizer(ModelConfig(name_or_path="unused", tokenizer=str(tiny_tokenizer_dir)))

    def marked(clean, corrupted):
        ids = tok(corrupted, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # end of turn after it
        pieces = decode_pieces(tok, ids)
        flags = changed_tokens(pieces, clean, corrupted)
        assert not flags[-1]  # the end-of-turn token is not part of the corruption
        return "".join(p for p, f in zip(pieces, flags) if f), "".join(p for p, f in zip(pieces, flags) if not f)

    bad, good = marked("The sum is 42. So the answer is yes.", "The sum is 17. So the answer is yes.")
    assert "17" in bad and "answer" in good and "answer" not in bad
    # a swapped-in answer: the phrase both answers share stays clean
    bad, good = marked("Birds fly south. So the answer is yes.", "Paris is a city in France. So the answer is yes.")
    assert "Par" in bad and "France" in bad and "So the answer is yes" in good
    with pytest.raises(NoiseError, match="not in its decoded tokens"):
        changed_tokens(["abc"], "x", "zzz")


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


# ------------------------------------------------------------------------------------------------
# positive controls
# ------------------------------------------------------------------------------------------------
def test_plant_controls_builds_both_groups_and_keeps_the_clean_text():
    from forgetting_ray.noise import PLANTED, REFERENCE_PHRASE, UNSEEN_PHRASE, plant_controls

    reference = [rec(i) for i in range(10)]
    train = [rec(i) for i in range(100, 140)]
    ref, planted, groups = plant_controls(reference, train, fraction=0.25, seed=1)
    assert all(r.messages[-1].content.endswith(PLANTED) for r in ref)
    assert sorted(groups.values()).count("planted") == 10 == sorted(groups.values()).count("replaced")
    assert planted.n_corrupted == 20 and planted.bad_ids == set(groups)
    for sid, group in groups.items():
        clean, new = planted.responses(sid)
        assert new == (clean + PLANTED if group == "planted" else clean.replace(REFERENCE_PHRASE, UNSEEN_PHRASE))


def test_shifted_scores_and_control_rates():
    from forgetting_ray.noise import control_rates, shifted_within_samples

    sample = np.array([0, 0, 0, 1, 1])
    np.testing.assert_array_equal(shifted_within_samples(np.array([1., 2., 3., 4., 5.]), sample), [1, 1, 2, 4, 4])
    view = TokenView(score=np.zeros(5, np.float32), token_class=np.array([1, 1, -1, -1, 1], np.int8),
                     bad=np.array([0, 1, 1, 1, 1], bool), sample=sample, sample_ids=["p", "r"],
                     changed=np.array([0, 1, 1, 1, 0], bool))
    r = control_rates(view.token_class, view, {"p": "planted", "r": "replaced"})
    assert r["planted_positive"] == 0.5 and r["replaced_negative"] == 1.0 and r["base_rate_negative"] == 0.4


def test_harmful_split_gives_three_disjoint_seeded_sets_in_input_order():
    records = [rec(i) for i in range(30)]
    reference, train, heldout = harmful_split(records, 8, 12, 6, seed=3)
    ids = [[r.sample_id for r in part] for part in (reference, train, heldout)]
    assert [len(x) for x in ids] == [8, 12, 6]
    assert len(set().union(*map(set, ids))) == 26  # disjoint
    position = {r.sample_id: i for i, r in enumerate(records)}
    assert all([position[i] for i in part] == sorted(position[i] for i in part) for part in ids)
    assert [[r.sample_id for r in part] for part in harmful_split(records, 8, 12, 6, seed=3)] == ids
    assert [r.sample_id for r in harmful_split(records, 8, 12, 6, seed=4)[2]] != ids[2]
    with pytest.raises(NoiseError):
        harmful_split(records, 8, 20, 6, seed=3)


def test_format_token_marks_find_the_end_of_turn_and_the_answer_phrase(tiny_tokenizer_dir, tmp_path):
    import pyarrow.parquet as pq

    from forgetting_ray.config import ModelConfig
    from forgetting_ray.data.table import rows_to_table
    from forgetting_ray.models import load_tokenizer
    from forgetting_ray.noise import format_token_marks
    from forgetting_ray.report.html import decode_pieces

    tok = load_tokenizer(ModelConfig(name_or_path="unused", tokenizer=str(tiny_tokenizer_dir)))
    responses = ["Birds fly south. So the answer is yes.", "No phrase here at all."]
    rows = []
    for i, text in enumerate(responses):
        prompt = tok("question?", add_special_tokens=False)["input_ids"]
        resp = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append({"sample_id": f"{i:016x}", "source": "s", "input_ids": prompt + resp,
                     "labels": [-100] * len(prompt) + resp})
    table = rows_to_table(rows)
    table = table.append_column("token_class", pa.array([[0] * len(r["labels"]) for r in rows], pa.list_(pa.int8())))
    pq.write_table(table, tmp_path / "part.parquet")
    eot, fmt = format_token_marks(tmp_path / "part.parquet", tok)
    first = len(tok(responses[0], add_special_tokens=False)["input_ids"]) + 1
    assert eot.size == fmt.size == first + len(tok(responses[1], add_special_tokens=False)["input_ids"]) + 1
    assert eot.nonzero()[0].tolist() == [first - 1, eot.size - 1]
    pieces = decode_pieces(tok, rows[0]["input_ids"][-first:])
    marked = "".join(p for p, f in zip(pieces, fmt[:first]) if f)
    assert "So the answer is" in marked and "Birds" not in marked and not fmt[first:].any()
