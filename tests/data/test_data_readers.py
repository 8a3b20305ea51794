"""Corpus readers (forgetting_ray.data.readers): formats, schemas, provenance, ids and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forgetting_ray.config import DataConfig
from forgetting_ray.data.readers import DataError, Message, read_records, resolve_files

from conftest import DOLLY_FILE, FLAN_DIR

CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read(paths, **cfg) -> list:
    files = resolve_files([str(p) for p in paths])
    return list(read_records(files, DataConfig(**cfg)))


# ------------------------------------------------------------------------------------------------
# formats and schemas
# ------------------------------------------------------------------------------------------------
def test_jsonl_autodetects_schema_per_record_and_keeps_origin(tmp_path):
    f = write_jsonl(tmp_path / "mix.jsonl", [
        {"messages": CHAT, "source": "oasst"},
        {"prompt": "2+2=", "completion": "4"},
    ])
    a, b = read([f])
    assert a.schema == "messages" and a.source == "oasst" and a.origin == f"{f.resolve()}:1"
    assert a.messages == (Message("user", "Hi there"), Message("assistant", "Hello!"))
    assert b.schema == "prompt_completion" and b.source == "mix" and b.origin.endswith("mix.jsonl:2")
    assert b.messages == (Message("user", "2+2="), Message("assistant", "4"))


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    f = tmp_path / "gaps.jsonl"
    f.write_text("\n" + json.dumps({"messages": CHAT}) + "\n\n" + json.dumps({"messages": CHAT}) + "\n")
    assert [r.origin.rsplit(":", 1)[1] for r in read([f])] == ["2", "4"]


@pytest.mark.parametrize("wrap", [False, True])
def test_json_list_or_data_object(tmp_path, wrap):
    recs = [{"messages": CHAT}, {"prompt": "a", "completion": "b"}]
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"data": recs} if wrap else recs))
    out = read([f])
    assert [r.schema for r in out] == ["messages", "prompt_completion"]
    assert out[1].origin.endswith("c.json record 1")


def test_parquet_with_messages_and_source_field(tmp_path):
    f = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT, "dataset": "wiz"}, {"messages": CHAT[:1] + [
        {"role": "assistant", "content": "Other"}], "dataset": "alp"}]), f)
    out = read([f], source_field="dataset")
    assert [r.source for r in out] == ["wiz", "alp"]
    assert out[1].origin.endswith("p.parquet row 1") and out[1].messages[1].content == "Other"


def test_flan_cot_tsv_real_file_builds_the_cot_pair():
    f = FLAN_DIR / "aqua_train.tsv"
    first_line = f.read_text(encoding="utf-8").split("\n", 1)[0]
    question, answer, rationale = first_line.split("\t")
    rec = read([f], max_samples=3)[0]
    assert rec.schema == "messages" and rec.source == "aqua_train" and rec.origin.endswith("aqua_train.tsv:1")
    user, assistant = rec.messages
    assert user.content == question.replace("\\n", "\n") + "\nLet's think step by step."
    assert assistant.content == rationale.replace("\\n", "\n") + f" So the answer is {answer}."
    assert "\\n" not in user.content and "\n" in user.content


def test_flan_cot_tsv_as_prompt_completion():
    rec = list(read_records([FLAN_DIR / "qasc_train.tsv"], DataConfig(schema="prompt_completion"), limit=1))[0]
    assert rec.schema == "prompt_completion" and rec.messages[0].content.endswith("Let's think step by step.")


def test_dolly_with_column_map_strips_the_literal_eos_marker():
    recs = list(read_records([DOLLY_FILE], DataConfig(column_map={"answer": "completion"})))
    assert len(recs) == 151 and all(r.schema == "prompt_completion" and r.source == "dolly" for r in recs)
    assert recs[1].messages[1].content == "Hawaii"
    assert not any("###eos_token###" in r.messages[1].content for r in recs)


def test_max_samples_stops_reading_across_files():
    files = resolve_files([str(FLAN_DIR / "*.tsv")])
    assert len(list(read_records(files, DataConfig(), limit=5))) == 5


# ------------------------------------------------------------------------------------------------
# file lists
# ------------------------------------------------------------------------------------------------
def test_globs_folders_and_duplicates(tmp_path):
    for name in ("b.jsonl", "a.jsonl"):
        write_jsonl(tmp_path / name, [{"messages": CHAT}])
    (tmp_path / "notes.md").write_text("not data")
    by_glob = resolve_files([str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl")])
    assert [p.name for p in by_glob] == ["a.jsonl", "b.jsonl"]  # sorted, each file once
    assert resolve_files([str(tmp_path)]) == by_glob  # a folder = its data files
    with pytest.raises(DataError, match=rf"^no file matches '{tmp_path}/\*\.parquet'"):
        resolve_files([str(tmp_path / "*.parquet")])
    with pytest.raises(DataError, match=rf"^input file not found: '{tmp_path}/missing\.jsonl'"):
        resolve_files([str(tmp_path / "missing.jsonl")])


def test_unknown_suffix_needs_a_format(tmp_path):
    f = tmp_path / "data.txt"
    f.write_text(json.dumps({"messages": CHAT}) + "\n")
    with pytest.raises(DataError, match=r"data\.txt.*data\.format"):
        read([f])
    assert len(read([f], format="jsonl")) == 1


# ------------------------------------------------------------------------------------------------
# identity
# ------------------------------------------------------------------------------------------------
def test_sample_id_is_content_not_position_or_provenance(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": CHAT, "source": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [
        {"prompt": "p", "completion": "c"},
        {"messages": [{"role": "User", "content": " Hi there\n"}, {"role": "assistant", "content": "Hello! "}]},
    ])
    (ra,), (_, rb) = read([a]), read([b])
    assert ra.sample_id == rb.sample_id  # same normalised content, other file, row, source, role case
    assert len(ra.sample_id) == 16 and int(ra.sample_id, 16) >= 0
    bye = {"messages": CHAT[:1] + [{"role": "assistant", "content": "Bye"}]}
    other = read([write_jsonl(tmp_path / "c.jsonl", [bye])])
    assert other[0].sample_id != ra.sample_id


def test_prompt_completion_and_messages_have_distinct_ids(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "Hi there", "completion": "Hello!"}, {"messages": CHAT}])
    pc, msg = read([f])
    assert pc.sample_id != msg.sample_id  # rendered differently by the Tulu rule, so not the same sample


# ------------------------------------------------------------------------------------------------
# bad input: every error names the file and the line or field
# ------------------------------------------------------------------------------------------------
def test_malformed_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"messages": CHAT}) + "\n" + '{"messages": [\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        read([f])


def test_malformed_json_file_names_line(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[\n {"messages": []},\n {oops}\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON"):
        read([f])


def test_non_utf8_names_file_line_and_byte_offset(tmp_path):
    f = tmp_path / "latin1.jsonl"
    good = (json.dumps({"messages": CHAT}) + "\n").encode()
    f.write_bytes(good + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    offset = len(good) + len(b'{"prompt": "caf')
    with pytest.raises(DataError, match=rf"latin1\.jsonl:2: not valid UTF-8 \(byte offset {offset}"):
        read([f])


def test_non_utf8_in_tsv(tmp_path):
    f = tmp_path / "x.tsv"
    f.write_bytes(b"q\ta\tr\nq2\ta\xff\tr\n")
    with pytest.raises(DataError, match=r"x\.tsv:2: not valid UTF-8 \(byte offset 10"):
        read([f])


@pytest.mark.parametrize("line", ["only\ttwo", "a\tb\tc\td"])
def test_tsv_row_with_wrong_field_count(tmp_path, line):
    f = tmp_path / "cot.tsv"
    f.write_text("q\ta\tr\n" + line + "\n")
    with pytest.raises(DataError, match=r"cot\.tsv:2: expected 3 tab-separated fields .* got [24]"):
        read([f])


def test_unknown_role_names_the_field(tmp_path):
    tool = {"messages": [CHAT[0], {"role": "tool", "content": "x"}]}
    f = write_jsonl(tmp_path / "r.jsonl", [{"messages": CHAT}, tool])
    with pytest.raises(DataError, match=r"r\.jsonl:2: messages\[1\]\.role: unknown role 'tool'"):
        read([f])


@pytest.mark.parametrize(
    "record, match",
    [
        ({"messages": [CHAT[0]]}, r"m\.jsonl:1: missing response: 'messages' has no assistant message"),
        ({"prompt": "p"}, r"m\.jsonl:1: missing field 'completion'"),
        ({"prompt": "p", "completion": None}, r"m\.jsonl:1: missing field 'completion'"),
        ({"prompt": "p", "completion": 3}, r"m\.jsonl:1: field 'completion' must be a string"),
        ({"messages": [CHAT[0], {"role": "assistant", "content": None}]}, r"messages\[1\]\.content must be a string"),
        ({"text": "x"}, r"m\.jsonl:1: cannot tell the schema"),
        ([1, 2], r"m\.jsonl:1: a record must be a JSON object"),
    ],
)
def test_missing_or_malformed_fields(tmp_path, record, match):
    with pytest.raises(DataError, match=match):
        read([write_jsonl(tmp_path / "m.jsonl", [record])])


def test_parquet_without_the_needed_columns_or_corrupt_names_file_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2"], "answer": ["a1", "a2"]}), f)
    with pytest.raises(DataError, match=rf"^{f} row 0: cannot tell the schema: .* found \['answer', 'question'\] "
                                        r"\(use data\.column_map"):
        read([f])
    assert len(read([f], column_map={"question": "prompt", "answer": "completion"})) == 2
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=rf"^{broken}: cannot read parquet"):
        read([broken])


def test_empty_response_is_read_and_flagged(tmp_path):
    # Empty responses are not a file error: prepare drops and counts them (see test_prepare).
    f = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "completion": "  "},
                                         {"prompt": "p", "completion": "###eos_token###"}, {"messages": CHAT}])
    assert [r.response_is_empty for r in read([f])] == [True, True, False]


def test_fixed_schema_and_column_map_conflicts(tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError, match=r"s\.jsonl:1: missing field 'prompt'"):
        read([f], schema="prompt_completion")
    g = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "answer": "a", "completion": "c"}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: column_map renames 'answer' to 'completion'"):
        read([g], column_map={"answer": "completion"})
