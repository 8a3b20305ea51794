"""Benchmark loaders on the shipped files, prompt strings against lm-eval's, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forgetting_ray.config import ConfigError, EvalConfig, load_config
from forgetting_ray.eval import asdiv, boolq, logiqa, truthfulqa, tydiqa
from forgetting_ray.eval.base import EvalDataError, UnknownTaskError
from forgetting_ray.eval.runner import get_task, load_docs, prepare_requests

from conftest import EVAL_DIR


@pytest.fixture(scope="module")
def cfg() -> EvalConfig:
    return EvalConfig(data_dir=str(EVAL_DIR))


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_loaders_read_every_row(cfg, tok):
    assert len(boolq.load(cfg)) == 3270
    assert len(truthfulqa.load(cfg)) == 817
    assert len(logiqa.load(cfg)) == 651
    assert len(asdiv.load(cfg)) == 2305
    assert len(tydiqa.load(cfg, tok)) == 440
    assert {d["lang"] for d in tydiqa.load(cfg.model_copy(update={"tydiqa_languages": "all", "limit": 5}), tok)} == set(
        tydiqa.LANGUAGES
    )
    first = truthfulqa.load(cfg)[0]
    assert first["question"].startswith("What is the smallest country")
    assert first["mc2_labels"][0] == 1


def test_limit_applies_per_task_and_per_tydiqa_language(cfg, tok):
    c = cfg.model_copy(update={"limit": 0.99})
    assert len(load_docs("truthfulqa", c)) == 809
    c = cfg.model_copy(update={"limit": 7, "limit_mode": "random", "tydiqa_languages": "all"})
    docs = load_docs("tydiqa", c, tok)
    assert len(docs) == 7 * 9
    assert load_docs("boolq", c)[0]["doc_id"] == load_docs("boolq", c)[0]["doc_id"]  # seeded: stable


# ---- prompts against the harness -------------------------------------------------------------



def _render(template: str, doc: dict) -> str:
    from lm_eval.utils import apply_template

    return apply_template(template, doc)


def test_boolq_prompt_matches_harness(cfg):
    pytest.importorskip("lm_eval")
    from forgetting_ray.eval.harness import _builtin

    y = _builtin("super_glue/boolq/default.yaml")
    for d in boolq.load(cfg)[:5]:
        assert boolq.prompt(d) == _render(y["doc_to_text"], d)
    assert [" " + c for c in y["doc_to_choice"]] == boolq.requests(d, cfg)["mc"]["choices"]
    assert boolq.prompt({"passage": "P -- x", "question": "is it"}) == "P -- x\nQuestion: is it?\nAnswer:"


def test_truthfulqa_prompt_matches_harness(cfg):
    pytest.importorskip("lm_eval")
    from forgetting_ray.eval.harness import _builtin

    y = _builtin("truthfulqa/truthfulqa_mc1.yaml")
    for d in truthfulqa.load(cfg)[:3]:
        assert truthfulqa.prompt(d) == _render(y["doc_to_text"], {"question": d["question"]})
    assert truthfulqa.prompt({"question": "Why?"}).endswith("Barcelona, Spain.\n\nQ: Why?\nA:")
    assert truthfulqa.QA_PREAMBLE.count("\nA: ") == 6


def test_logiqa_prompt_matches_harness(cfg):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks.logiqa.utils_logiqa import doc_to_target, doc_to_text

    for d in logiqa.load(cfg)[:5]:
        assert logiqa.prompt(d) == doc_to_text(d)
        assert logiqa.score(d, {"mc": [[0.0, False]] * 4})["gold"] == doc_to_target(d)
    d = logiqa.load(cfg)[0]
    assert d["context"].startswith("In the planning of a new district")
    assert ". These four communities" in d["context"]  # the loader's replace(".", ". ") kept


def test_asdiv_prompt_and_target_match_harness(cfg):
    pytest.importorskip("lm_eval")
    from forgetting_ray.eval.harness import _builtin

    y = _builtin("asdiv/default.yaml")
    for d in asdiv.load(cfg)[:5]:
        assert asdiv.prompt(d) == _render(y["doc_to_text"], d)
        assert asdiv.score(d, {"gen": "x"})["gold"] == _render(y["doc_to_target"], d)
    assert asdiv.prompt(asdiv.load(cfg)[0]) == (
        "Seven red apples and two green apples are in the basket.\nQuestion:How many apples are in the basket?\nAnswer:"
    )


def test_tydiqa_prompt_is_method_section_8(cfg, tok):
    demo = {"context": "C1", "question": "Q1", "answers": ["A1"]}
    ex = {"context": "C2", "question": "Q2", "answers": ["A2"]}
    assert tydiqa.build_prompt("english", demo, ex) == (
        "Answer the following question based on the information in the given passage.\n\n"
        "Passage: C1\nQuestion: Q1\nAnswer: A1\n\nPassage: C2\nQuestion: Q2\nAnswer:"
    )
    assert tydiqa.build_prompt("finnish", demo, ex).startswith("Vastaa seuraavaan")
    long = " ".join(["word"] * 2000)
    cut = tydiqa.truncate_context(long, tok, 512)
    assert len(tok.encode(cut, add_special_tokens=False)) <= 520 and len(cut) < len(long)
    assert tydiqa.truncate_context("short passage", tok, 512) == "short passage"
    # 1-shot: the demonstration never is one of the test questions of its language
    c = cfg.model_copy(update={"tydiqa_languages": "all", "limit": None})
    docs = tydiqa.load(c, tok)
    for d in docs[:50] + docs[-50:]:
        demo_q = d["prompt"].split("\n\n")[1]
        assert d["prompt"].split("\n\n")[2] != demo_q


def test_requests_are_json_and_sorted(cfg, tok):
    c = cfg.model_copy(update={"limit": 3, "asdiv_mode": "both"})
    docs = {n: load_docs(n, c, tok) for n in ("boolq", "asdiv", "truthfulqa")}
    rows = prepare_requests(docs, c)
    json.dumps(rows)
    kinds = [r["request"]["kind"] for r in rows]
    assert kinds == sorted(kinds)  # gen before mc, each block longest first
    assert len(rows) == 3 + 6 + 3


# ---- bad input -------------------------------------------------------------------------------
def _with(tmp_path: Path, key: str, name: str, text: str) -> EvalConfig:
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    return EvalConfig(data_dir=str(EVAL_DIR), task_files={key: str(f)})


def test_missing_file_names_the_path(tmp_path):
    c = EvalConfig(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(EvalDataError, match=r"boolq.*nowhere/boolq/boolq_validation.csv"):
        boolq.load(c)


def test_malformed_boolq_row_named(tmp_path):
    c = _with(tmp_path, "boolq", "b.csv", 'question,passage,idx,label\nis it,"P, q",0,1\nis it,P,1,maybe\n')
    with pytest.raises(EvalDataError, match=r"b.csv: row 3.*label='maybe'"):
        boolq.load(c)
    c = _with(tmp_path, "boolq", "h.csv", "q,passage,label\nx,y,1\n")
    with pytest.raises(EvalDataError, match="header lacks"):
        boolq.load(c)


def test_malformed_truthfulqa_named(tmp_path):
    c = _with(tmp_path, "truthfulqa", "t.json", '[{"question": "q", "mc1_targets": {"a": 1}}')
    with pytest.raises(EvalDataError, match="t.json: not valid JSON"):
        truthfulqa.load(c)
    rows = [{"question": "q", "mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1}},
            {"question": "q2", "mc1_targets": {"a": 1, "b": 0}}]
    c = _with(tmp_path, "truthfulqa", "t2.json", json.dumps(rows))
    with pytest.raises(EvalDataError, match=r"t2.json: row 1: field 'mc2_targets'"):
        truthfulqa.load(c)


def test_malformed_logiqa_record_line(tmp_path):
    good = "\na\nctx.\nq?\nA.x\nB.y\nC.z\nD.w\n"
    bad = "\nb\nctx\nq\nA.x\nB.y\nC.z\n"  # one option missing, starts at line 10
    c = _with(tmp_path, "logiqa", "l.txt", good + bad)
    with pytest.raises(EvalDataError, match=r"l.txt: line 10: a record needs 7 lines"):
        logiqa.load(c)
    c = _with(tmp_path, "logiqa", "l2.txt", "\ne\nctx\nq\nA.x\nB.y\nC.z\nD.w\n")
    with pytest.raises(EvalDataError, match=r"line 2: answer must be one of"):
        logiqa.load(c)


def test_malformed_asdiv_problem(tmp_path):
    xml = ('<Machine-Reading-Corpus-File><ProblemSet><Problem ID="p1"><Body>b</Body><Question>q</Question>'
           "<Answer>1 (x)</Answer></Problem><Problem ID=\"p2\"><Body>b</Body><Question>q</Question></Problem>"
           "</ProblemSet></Machine-Reading-Corpus-File>")
    c = _with(tmp_path, "asdiv", "a.xml", xml)
    with pytest.raises(EvalDataError, match=r"a.xml: problem 1 \(ID 'p2'\): missing or empty <Answer>"):
        asdiv.load(c)
    c = _with(tmp_path, "asdiv", "b.xml", "<Problem><Body>")
    with pytest.raises(EvalDataError, match="b.xml: not well-formed XML"):
        asdiv.load(c)


def test_malformed_tydiqa_question(tmp_path, tok):
    data = {"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "english-1", "question": "q", "answers": []}]}]}]}
    c = _with(tmp_path, "tydiqa", "t.json", json.dumps(data))
    with pytest.raises(EvalDataError, match=r"t.json: data\[0\].paragraphs\[0\].qas\[0\]: needs at least one answer"):
        tydiqa.load(c, tok)


def test_unknown_task_name():
    with pytest.raises(UnknownTaskError, match="unknown eval task 'mmlu'.*boolq"):
        get_task("mmlu")
    with pytest.raises(ConfigError, match="eval.tasks"):
        load_config(None, ["eval.tasks=[boolq, mmlu]"])
    with pytest.raises(ConfigError, match="eval.task_files"):
        load_config(None, ["eval.task_files={squad: x.json}"])
    with pytest.raises(ConfigError, match="eval.limit"):
        load_config(None, ["eval.limit=2.5"])


def test_unparsable_answers_are_wrong_and_counted(cfg):
    docs = asdiv.load(cfg)[:3]
    recs = [asdiv.score(d, {"gen": g}) for d, g in zip(docs, [" 9\n", " nine apples", " 16"])]
    agg = asdiv.aggregate(recs)
    assert [r["acc"] for r in recs] == [1.0, 0.0, 1.0]  # golds: 9, 15, 16
    assert agg["n_unparsable"] == 1.0 and agg["acc"] == pytest.approx(2 / 3)
