"""Corruption, the study's splits and the positive controls' corpora (forgetting_ray.studies.corruption), on
hand-made records."""

from __future__ import annotations

import pytest

from forgetting_ray.config import DataConfig
from forgetting_ray.data.readers import Message, Record, read_records
from forgetting_ray.studies.corruption import (
    PLANTED,
    REFERENCE_PHRASE,
    UNSEEN_PHRASE,
    corrupt_records,
    harmful_split,
    plant_controls,
    write_jsonl,
)
from forgetting_ray.studies.errors import NoiseError


def rec(i: int, response: str | None = None) -> Record:
    return Record("messages", (Message("user", f"question {i}?"),
                               Message("assistant", response or f"because reason number {i} holds. So the answer is {i}.")),
                  "src", f"f:{i}")


RECORDS = [rec(i) for i in range(20)]


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
# positive controls
# ------------------------------------------------------------------------------------------------
def test_plant_controls_builds_both_groups_and_keeps_the_clean_text():
    reference = [rec(i) for i in range(10)]
    train = [rec(i) for i in range(100, 140)]
    ref, planted, groups = plant_controls(reference, train, fraction=0.25, seed=1)
    assert all(r.messages[-1].content.endswith(PLANTED) for r in ref)
    assert sorted(groups.values()).count("planted") == 10 == sorted(groups.values()).count("replaced")
    assert planted.n_corrupted == 20 and planted.bad_ids == set(groups)
    for sid, group in groups.items():
        clean, new = planted.responses(sid)
        assert new == (clean + PLANTED if group == "planted" else clean.replace(REFERENCE_PHRASE, UNSEEN_PHRASE))


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
