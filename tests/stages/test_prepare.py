"""PREPARE stage (forgetting_ray.stages.prepare) and the token table (forgetting_ray.data.table)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from forgetting_ray.config import DataConfig, PipelineConfig
from forgetting_ray.stages import prepare as prepare_mod
from forgetting_ray.data import table as table_mod
from forgetting_ray.stages.prepare import PrepareError, run_prepare
from forgetting_ray.data.readers import DataError, read_records, resolve_files
from forgetting_ray.data.render import IGNORE_INDEX, RenderError
from forgetting_ray.data.table import (
    TOKEN_TABLE_SCHEMA,
    TokenTableError,
    read_token_table,
    rows_to_table,
    token_table_hash,
    write_token_table,
)

from conftest import DOLLY_FILE, FLAN_DIR

DOLLY_MAP = {"answer": "completion"}


def make_cfg(run_dir: Path, tokenizer_dir: Path, files: list, **data) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "run_dir": str(run_dir),
        "model": {"name_or_path": "tiny-test", "tokenizer": str(tokenizer_dir)},
        "data": {"train_files": [str(f) for f in files], **data},
    })


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture(scope="module")
def flan_run(tmp_path_factory, tiny_tokenizer_dir):
    """FLAN CoT (first 400 rows) with the ChatML tokenizer, prepared once for several tests."""
    cfg = make_cfg(tmp_path_factory.mktemp("flan"), tiny_tokenizer_dir, [FLAN_DIR / "*.tsv"],
                   max_samples=400, max_length=512)
    return cfg, run_prepare(cfg)


# ------------------------------------------------------------------------------------------------
# real corpora
# ------------------------------------------------------------------------------------------------
def test_flan_tables_masks_decode_to_response_plus_end_of_turn(flan_run, tiny_tokenizer_dir):
    cfg, res = flan_run
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    records = {r.sample_id: r for r in read_records(resolve_files(cfg.data.train_files), cfg.data, limit=400)}
    checked = 0
    for path in (res.train_path, res.reference_path):
        for row in read_token_table(path).to_pylist():
            if row["length"] == cfg.data.max_length:
                continue  # truncated rows end early by design
            trained = tok.decode([t for t in row["labels"] if t != IGNORE_INDEX])
            assert trained == records[row["sample_id"]].messages[-1].content + "<|im_end|>"
            assert row["source"] == "aqua_train"
            checked += 1
    assert checked > 350


def test_flan_manifest_content(flan_run, tiny_tokenizer_dir):
    cfg, res = flan_run
    m = res.read_manifest()
    train, ref = read_token_table(res.train_path), read_token_table(res.reference_path)
    assert m["key"] == res.key == res.dir.name and res.dir.parent.name == "prepare"
    assert m["model"] == "tiny-test" and m["template"] == "chat_template" and m["max_length"] == 512
    assert len(m["tokenizer_fingerprint"]) == 16
    assert [e["path"].rsplit("/", 1)[1] for e in m["inputs"]["train"]][0] == "aqua_train.tsv"
    assert all(len(e["sha256"]) == 64 for e in m["inputs"]["train"])
    c = m["counts"]
    assert c["records_read"] == 400 and c["duplicates_across_removed_from_train"] == 0
    removed = c["duplicates_within_corpus"] + sum(c["dropped"].values())
    assert c["records_read"] == train.num_rows + ref.num_rows + removed
    for name, table in (("train", train), ("reference", ref)):
        s = m["sets"][name]
        assert s["sample_ids"] == table.column("sample_id").to_pylist()
        assert s["n_samples"] == table.num_rows
        assert s["n_tokens"] == sum(table.column("length").to_pylist())
        assert s["n_response_tokens"] == sum(table.column("n_response").to_pylist())
        assert s["content_hash"] == token_table_hash(table)
        assert s["per_source"]["aqua_train"]["samples"] == table.num_rows
    assert c["truncated"] == m["sets"]["train"]["truncated"] + m["sets"]["reference"]["truncated"]
    assert ref.num_rows == round(0.2 * (train.num_rows + ref.num_rows))
    assert m["split"] == {"mode": "fraction", "seed": 42, "reference_count": ref.num_rows, "reference_fraction": 0.2}


def test_sets_are_disjoint_and_keep_file_order(flan_run):
    _, res = flan_run
    m = res.read_manifest()
    train_ids, ref_ids = m["sets"]["train"]["sample_ids"], m["sets"]["reference"]["sample_ids"]
    assert not set(train_ids) & set(ref_ids) and len(set(train_ids)) == len(train_ids)
    rows = [int(o.rsplit(":", 1)[1]) for o in _origins(res, train_ids)]
    assert rows == sorted(rows)  # training order = file order (docs/method.md §11 item 8)


def _origins(res, ids):
    cfg_files = [e["path"] for e in res.read_manifest()["inputs"]["train"]]
    by_id = {r.sample_id: r.origin for r in read_records([Path(f) for f in cfg_files], DataConfig(), limit=400)}
    return [by_id[i] for i in ids]


def test_second_run_is_a_cache_hit_without_work(flan_run, monkeypatch):
    cfg, first = flan_run
    stamp = first.train_path.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("a cache hit must not render anything")

    monkeypatch.setattr(prepare_mod, "Renderer", boom)
    again = run_prepare(cfg)
    assert again.cached and not first.cached and again.key == first.key and again.dir == first.dir
    assert again.train_path.stat().st_mtime_ns == stamp


def test_dolly_tulu_path_with_plain_tokenizer(tmp_path, tiny_plain_tokenizer_dir):
    cfg = make_cfg(tmp_path, tiny_plain_tokenizer_dir, [DOLLY_FILE], column_map=DOLLY_MAP, max_length=65536,
                   reference_count=10)
    res = run_prepare(cfg)
    m = res.read_manifest()
    assert m["template"] == "tulu" and m["counts"]["dropped"] == {} and m["counts"]["records_read"] == 151
    assert m["sets"]["reference"]["n_samples"] == 10 and m["sets"]["train"]["n_samples"] == 141
    assert m["split"]["mode"] == "count"
    tok = AutoTokenizer.from_pretrained(tiny_plain_tokenizer_dir)
    answers = {r.sample_id: r.messages[1].content for r in read_records([DOLLY_FILE], cfg.data)}
    for row in read_token_table(res.train_path).to_pylist():
        trained = tok.decode([t for t in row["labels"] if t != IGNORE_INDEX])
        assert trained == " " + answers[row["sample_id"]] + "<|endoftext|>"  # prompts end with "Response:"
        assert row["source"] == "dolly"


def test_sample_ids_stable_across_reruns_and_file_order(tmp_path, tiny_tokenizer_dir):
    files = [DOLLY_FILE, FLAN_DIR / "qasc_train.tsv"]
    a = run_prepare(make_cfg(tmp_path / "a", tiny_tokenizer_dir, files, column_map=DOLLY_MAP, max_length=1024))
    b = run_prepare(make_cfg(tmp_path / "b", tiny_tokenizer_dir, files[::-1], column_map=DOLLY_MAP, max_length=1024))
    again = run_prepare(make_cfg(tmp_path / "c", tiny_tokenizer_dir, files, column_map=DOLLY_MAP, max_length=1024))
    ma, mb, mc = a.read_manifest(), b.read_manifest(), again.read_manifest()
    assert not again.cached and again.key == a.key and mc["sets"] == ma["sets"]  # fresh run, same bytes
    assert a.key != b.key  # file order changes the row order, so it is another table
    for name in ("train", "reference"):
        assert set(ma["sets"][name]["sample_ids"]) == set(mb["sets"][name]["sample_ids"])
        assert ma["sets"][name]["sample_ids"] != mb["sets"][name]["sample_ids"]  # but in file order
    assert ma["sets"]["train"]["per_source"].keys() == {"dolly", "qasc_train"}


def test_changed_input_or_setting_changes_the_key(tmp_path, tiny_tokenizer_dir):
    f = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(10)])
    base = run_prepare(make_cfg(tmp_path / "run", tiny_tokenizer_dir, [f]))
    other_seed = run_prepare(make_cfg(tmp_path / "run", tiny_tokenizer_dir, [f], split_seed=7))
    write_jsonl(f, [chat(f"q{i}", f"a{i}") for i in range(11)])
    other_data = run_prepare(make_cfg(tmp_path / "run", tiny_tokenizer_dir, [f]))
    assert len({base.key, other_seed.key, other_data.key}) == 3 and not other_data.cached


# ------------------------------------------------------------------------------------------------
# duplicates and the reference split
# ------------------------------------------------------------------------------------------------
def test_duplicates_within_and_across_reference_files(tmp_path, tiny_tokenizer_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(f"q{i}", f"a{i}") for i in range(12)]
                        + [chat("q0", "a0"), chat(" q1 ", "a1")])  # 2 duplicates within the corpus
    ref = write_jsonl(tmp_path / "ref.jsonl", [chat("q3", "a3"), chat("q5", "a5"), chat("r", "s"), chat("r", "s")])
    res = run_prepare(make_cfg(tmp_path / "run", tiny_tokenizer_dir, [train], reference_files=[str(ref)]))
    m = res.read_manifest()
    c = m["counts"]
    assert c["duplicates_across_removed_from_train"] == 2
    assert c["by_corpus"]["train"]["duplicates_within_corpus"] == 2
    assert c["by_corpus"]["reference"]["duplicates_within_corpus"] == 1
    assert c["records_read"] == 18 and m["split"]["mode"] == "files"
    assert m["sets"]["reference"]["n_samples"] == 3 and m["sets"]["train"]["n_samples"] == 10
    train_ids, ref_ids = (set(read_token_table(p).column("sample_id").to_pylist())
                          for p in (res.train_path, res.reference_path))
    assert not train_ids & ref_ids
    ref_set = m["sets"]["reference"]
    assert ref_set["per_source"] == {
        "ref": {"samples": 3, "tokens": ref_set["n_tokens"], "response_tokens": ref_set["n_response_tokens"]}
    }


def test_split_is_seeded_and_independent_of_file_order(tmp_path, tiny_tokenizer_dir):
    recs = [chat(f"question {i}", f"answer {i}") for i in range(30)]
    a = write_jsonl(tmp_path / "a.jsonl", recs)
    b = write_jsonl(tmp_path / "b.jsonl", recs[::-1])
    ref = lambda f, **kw: set(run_prepare(make_cfg(tmp_path / "run", tiny_tokenizer_dir, [f], reference_count=7, **kw))
                              .read_manifest()["sets"]["reference"]["sample_ids"])
    assert ref(a) == ref(b) and len(ref(a)) == 7
    assert ref(a, split_seed=1) != ref(a)


def test_reference_split_needs_enough_samples(tmp_path, tiny_tokenizer_dir):
    f = write_jsonl(tmp_path / "small.jsonl", [chat("q", "a"), chat("q2", "a2")])
    with pytest.raises(PrepareError, match=r"^data\.reference_count=2: the reference split needs 2 samples but only 2 usable"):
        run_prepare(make_cfg(tmp_path / "run", tiny_tokenizer_dir, [f], reference_count=2))
    assert files_under(tmp_path / "run") == []


# ------------------------------------------------------------------------------------------------
# drops, errors, atomicity
# ------------------------------------------------------------------------------------------------
def test_empty_and_fully_truncated_responses_are_dropped_and_counted(tmp_path, tiny_tokenizer_dir):
    good = [chat(f"q{i}", f"a{i}") for i in range(8)]
    f = write_jsonl(tmp_path / "d.jsonl", good + [
        {"prompt": "p", "completion": ""},                       # line 9: empty response
        chat("word " * 200, "never seen"),                       # line 10: response cut off entirely
        chat("q", "long answer " * 100),                         # line 11: truncated, still trainable
    ])
    res = run_prepare(make_cfg(tmp_path / "run", tiny_tokenizer_dir, [f], max_length=64))
    m = res.read_manifest()
    assert m["counts"]["dropped"] == {"empty_response": 1, "fully_truncated": 1}
    assert {(d["origin"].rsplit("/", 1)[1], d["reason"]) for d in m["dropped_samples"]} == {
        ("d.jsonl:9", "empty_response"), ("d.jsonl:10", "fully_truncated")}
    assert m["counts"]["truncated"] == 1
    kept = m["sets"]["train"]["n_samples"] + m["sets"]["reference"]["n_samples"]
    assert kept == 9 and all(n <= 64 for n in read_token_table(res.train_path).column("length").to_pylist())


def test_all_samples_dropped_is_an_error(tmp_path, tiny_tokenizer_dir):
    f = write_jsonl(tmp_path / "d.jsonl", [chat("word " * 200, "x"), {"prompt": "p", "completion": " "}])
    with pytest.raises(PrepareError, match=rf"^{f}: no response tokens to train on: all 2 records of the training corpus "
                                           r"were dropped.*raise data\.max_length"):
        run_prepare(make_cfg(tmp_path / "run", tiny_tokenizer_dir, [f], max_length=32))
    assert files_under(tmp_path / "run") == []


def test_every_response_empty_names_the_files_and_writes_nothing(tmp_path, tiny_tokenizer_dir):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": ""}, chat("q", "  ")])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "q2"},
                                                         {"role": "assistant", "content": "###eos_token###"}]}])
    with pytest.raises(PrepareError) as e:
        run_prepare(make_cfg(tmp_path / "run", tiny_tokenizer_dir, [a, b]))
    msg = str(e.value)
    assert msg.startswith(f"{a}, {b}: no response tokens to train on: all 3 records of the training corpus"), msg
    assert "every response is empty" in msg and "data.column_map" in msg
    assert files_under(tmp_path / "run") == []


@pytest.mark.parametrize("body", ["", "\n\n  \n"])
def test_empty_corpus_file_fails_prepare_naming_it_and_writes_nothing(tmp_path, tiny_tokenizer_dir, body):
    good = write_jsonl(tmp_path / "good.jsonl", [chat(f"q{i}", f"a{i}") for i in range(4)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text(body)
    with pytest.raises(DataError, match=rf"^{empty}: no records \(the file is empty or holds only blank lines\)$"):
        run_prepare(make_cfg(tmp_path / "run", tiny_tokenizer_dir, [good, empty]))
    assert files_under(tmp_path / "run") == []


def test_bad_record_aborts_naming_file_and_line(tmp_path, tiny_tokenizer_dir):
    f = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a"), {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: messages\[0\]\.role: unknown role 'bot'"):
        run_prepare(make_cfg(tmp_path / "run", tiny_tokenizer_dir, [f]))
    assert files_under(tmp_path / "run") == []


def test_chat_template_without_assistant_span_fails_the_stage(tmp_path, tiny_tokenizer_dir):
    tok_dir = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|im_start|>user\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok.save_pretrained(tok_dir)
    f = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a"), chat("q2", "a2")])
    with pytest.raises(RenderError, match=r"d\.jsonl:1: the chat template yields no assistant span"):
        run_prepare(make_cfg(tmp_path / "run", tok_dir, [f]))
    assert files_under(tmp_path / "run") == []


def test_interrupted_write_leaves_nothing_behind(tmp_path, tiny_tokenizer_dir, monkeypatch):
    f = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(10)])
    cfg = make_cfg(tmp_path / "run", tiny_tokenizer_dir, [f])
    real_write = pq.write_table
    calls = []

    def crash_mid_write(table, where, **kw):
        calls.append(where)
        if len(calls) == 2:  # the reference table: train is already on disk in the temporary folder
            Path(where).write_bytes(b"PAR1 half a file")
            raise KeyboardInterrupt("simulated kill mid-write")
        real_write(table, where, **kw)

    monkeypatch.setattr(table_mod.pq, "write_table", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(cfg)
    assert len(calls) == 2 and files_under(tmp_path / "run") == []
    monkeypatch.setattr(table_mod.pq, "write_table", real_write)
    res = run_prepare(cfg)  # a rerun starts clean and completes
    assert not res.cached and read_token_table(res.reference_path).num_rows == 2


# ------------------------------------------------------------------------------------------------
# token table
# ------------------------------------------------------------------------------------------------
I32, I64 = pa.list_(pa.int32()), pa.list_(pa.int64())
ROWS = [
    {"sample_id": "0123456789abcdef", "source": "s", "input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    {"sample_id": "fedcba9876543210", "source": "t", "input_ids": [8, 9], "labels": [-100, 9]},
]


def test_token_table_roundtrip_and_schema(tmp_path):
    path = write_token_table(ROWS, tmp_path / "t.parquet")
    t = read_token_table(path)
    assert t.schema.remove_metadata().equals(TOKEN_TABLE_SCHEMA)
    assert t.column("length").to_pylist() == [3, 2] and t.column("n_response").to_pylist() == [2, 1]
    again = read_token_table(write_token_table(t, tmp_path / "u.parquet"))
    assert token_table_hash(again) == token_table_hash(t)
    empty = write_token_table([], tmp_path / "e.parquet")
    assert read_token_table(empty).num_rows == 0


@pytest.mark.parametrize(
    "mutate, column, problem",
    [
        (lambda t: t.drop_columns(["n_response"]), "n_response", "missing"),
        (lambda t: t.set_column(2, "input_ids", pa.array([[5, 6, 7], [8, 9]], I64)), "input_ids", "type"),
        (lambda t: t.set_column(5, "n_response", pa.array([2, 2], pa.int32())), "n_response", "count of labels"),
        (lambda t: t.set_column(4, "length", pa.array([3, 3], pa.int32())), "length", "len\\(input_ids\\)"),
        (lambda t: t.set_column(3, "labels", pa.array([[-100, 6, 1], [-100, 9]], I32)), "labels", "differs from the input"),
        (lambda t: t.set_column(3, "labels", pa.array([[-100, 6], [-100, 9]], I32)), "labels", "differ in length"),
        (lambda t: t.set_column(0, "sample_id", pa.array(["0123456789abcdef"] * 2)), "sample_id", "duplicate"),
        (lambda t: t.set_column(0, "sample_id", pa.array(["row-0", "row-1"])), "sample_id", "16 lowercase hex"),
        (lambda t: t.append_column("score", pa.array([0.1, 0.2])), "score", "unexpected column"),
    ],
)
def test_malformed_token_table_names_file_and_column(tmp_path, mutate, column, problem):
    path = tmp_path / "bad.parquet"
    pq.write_table(mutate(rows_to_table(ROWS)), path)
    with pytest.raises(TokenTableError, match=rf"bad\.parquet: token table column '{column}': .*{problem}"):
        read_token_table(path)
    with pytest.raises(TokenTableError, match=column):
        write_token_table(mutate(rows_to_table(ROWS)), tmp_path / "never.parquet")
    assert not (tmp_path / "never.parquet").exists()
