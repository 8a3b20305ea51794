"""Which tokens a corruption changed and the format tokens (forgetting_ray.studies.token_view), on the tiny
tokenizer."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forgetting_ray.config import ModelConfig
from forgetting_ray.data.table import rows_to_table
from forgetting_ray.data.tokens import decode_pieces
from forgetting_ray.models import load_tokenizer
from forgetting_ray.studies.errors import NoiseError
from forgetting_ray.studies.token_view import changed_tokens, format_token_marks


def test_only_tokens_whose_characters_changed_count_as_corrupted(tiny_tokenizer_dir):
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


def test_format_token_marks_find_the_end_of_turn_and_the_answer_phrase(tiny_tokenizer_dir, tmp_path):
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
