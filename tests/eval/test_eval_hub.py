"""Benchmarks read through Hugging Face ``datasets`` (eval.task_files naming a dataset) give the same docs
as the shipped files they were converted from.  Real ``datasets``, no mocks: each test lays out, inside
tmp_path, a folder as a Hub dataset repository holds it (data files under data/ and a dataset card whose
YAML header lists them per split), a save_to_disk folder, or a mapping with split/data_files/streaming."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import datasets
import pytest
import yaml

from forgetting_ray.config import DatasetSpec, EvalConfig, PipelineConfig, load_config
from forgetting_ray.errors import UserError
from forgetting_ray.eval import asdiv, boolq, logiqa, truthfulqa, tydiqa
from forgetting_ray.eval.base import EvalDataError, resolve_input
from forgetting_ray.stages.evaluate import check_eval_files, eval_key

from conftest import EVAL_DIR

N = 40  # rows per converted benchmark: enough to cover the mapping, small enough to stay fast
SHIPPED = EvalConfig(data_dir=str(EVAL_DIR))


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def hub_repo(root: Path, configs: dict[str, dict[str, list[dict]]], fmt: str = "parquet") -> Path:
    """A folder as `hf download --repo-type dataset` leaves it: data files and a card listing them.

    ``configs``: config name -> split -> rows; a lone "default" config keeps its files under data/.
    """
    card = []
    for config, splits in configs.items():
        folder = "data" if list(configs) == ["default"] else config
        (root / folder).mkdir(parents=True)
        for split, rows in splits.items():
            file = root / folder / f"{split}-00000-of-00001.{fmt}"
            if fmt == "parquet":
                datasets.Dataset.from_list(rows).to_parquet(str(file))
            else:
                file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        card.append({"config_name": config,
                     "data_files": [{"split": s, "path": f"{folder}/{s}-*.{fmt}"} for s in splits]})
    header = yaml.safe_dump({"configs": card}, sort_keys=False)
    (root / "README.md").write_text(f"---\n{header}---\n# A benchmark laid out like a Hub dataset\n", encoding="utf-8")
    return root


def with_files(**task_files: Any) -> EvalConfig:
    return SHIPPED.model_copy(update={"task_files": EvalConfig(task_files=task_files).task_files})


# ---- the shipped files, converted to each benchmark's Hub schema ----------------------------------
def boolq_csv(n: int = N) -> list[dict[str, str]]:
    with open(EVAL_DIR / "boolq" / "boolq_validation.csv", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))[:n]


def google_boolq(n: int = N) -> list[dict]:  # google/boolq
    return [{"question": r["question"], "answer": r["label"] == "1", "passage": r["passage"]} for r in boolq_csv(n)]


def super_glue_boolq(n: int = N) -> list[dict]:  # aps/super_glue, config boolq
    return [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["label"])}
            for i, r in enumerate(boolq_csv(n))]


def truthful_qa_mc() -> list[dict]:  # truthfulqa/truthful_qa, config multiple_choice
    rows = json.loads((EVAL_DIR / "truthfulqa" / "mc_task.json").read_text(encoding="utf-8"))[:N]

    def targets(t: dict[str, int]) -> dict[str, list]:
        return {"choices": list(t), "labels": list(t.values())}

    return [{"question": r["question"], "mc1_targets": targets(r["mc1_targets"]),
             "mc2_targets": targets(r["mc2_targets"])} for r in rows]


def lucasmccabe_logiqa() -> list[dict]:  # lucasmccabe/logiqa (the text as the local loader normalises it)
    return [{"context": d["context"], "query": d["question"], "options": d["options"],
             "correct_option": logiqa.LETTERS.index(d["label"])} for d in logiqa.load(SHIPPED)[:N]]


def eleuther_asdiv() -> list[dict]:  # EleutherAI/asdiv
    problems = ET.parse(EVAL_DIR / "asdiv" / "ASDiv.xml").getroot().iter("Problem")
    return [{"body": p.findtext("Body"), "question": p.findtext("Question"),
             "solution_type": p.findtext("Solution-Type"), "answer": p.findtext("Answer"),
             "formula": p.findtext("Formula")} for p, _ in zip(problems, range(N))]


def tydiqa_goldp(path: Path) -> list[dict]:  # google-research-datasets/tydiqa, config secondary_task
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    return [{"id": qa["id"], "title": article.get("title", ""), "context": para["context"], "question": qa["question"],
             "answers": {"text": [a["text"] for a in qa["answers"]],
                         "answer_start": [a["answer_start"] for a in qa["answers"]]}}
            for article in data for para in article["paragraphs"] for qa in para["qas"]]


# ---- same docs as the shipped files -----------------------------------------------------------------
def test_boolq_hub_folder_in_either_schema_gives_the_files_docs(tmp_path):
    native = boolq.load(SHIPPED)[:N]
    google = hub_repo(tmp_path / "google_boolq", {"default": {"train": google_boolq(3), "validation": google_boolq()}})
    assert boolq.load(with_files(boolq=str(google))) == native  # the split defaults to the benchmark's
    assert boolq.load(EvalConfig(data_dir=str(tmp_path), task_files={"boolq": "google_boolq"})) == native
    glue = hub_repo(tmp_path / "super_glue", {"boolq": {"validation": super_glue_boolq()}}, fmt="jsonl")
    assert boolq.load(with_files(boolq={"path": str(glue), "name": "boolq"})) == native


def test_mapping_with_split_and_data_files_validates_from_yaml(tmp_path):
    glue = hub_repo(tmp_path / "super_glue", {"boolq": {"validation": super_glue_boolq()}}, fmt="jsonl")
    conf = tmp_path / "eval.yaml"
    conf.write_text(yaml.safe_dump({"eval": {"data_dir": str(EVAL_DIR), "task_files": {"boolq": {
        "path": str(glue), "split": "dev", "data_files": {"dev": "boolq/validation-*.jsonl"}}}}}), encoding="utf-8")
    cfg = load_config(conf).eval
    assert cfg.task_files["boolq"] == DatasetSpec(
        path=str(glue), split="dev", data_files={"dev": "boolq/validation-*.jsonl"})
    assert boolq.load(cfg) == boolq.load(SHIPPED)[:N]


def test_truthfulqa_multiple_choice_config(tmp_path):
    repo = hub_repo(tmp_path / "truthful_qa", {
        "generation": {"validation": [{"question": "q", "best_answer": "a"}]},
        "multiple_choice": {"validation": truthful_qa_mc()}})
    c = with_files(truthfulqa={"path": str(repo), "name": "multiple_choice"})
    assert truthfulqa.load(c) == truthfulqa.load(SHIPPED)[:N]


def test_logiqa_from_a_save_to_disk_folder(tmp_path):
    folder = tmp_path / "logiqa_saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(lucasmccabe_logiqa()[:2]),
                          "test": datasets.Dataset.from_list(lucasmccabe_logiqa())}).save_to_disk(str(folder))
    c = with_files(logiqa=str(folder))
    assert logiqa.load(c) == logiqa.load(SHIPPED)[:N]
    rows = [{"label": d["label"], "context": d["context"], "question": d["question"], "options": d["options"]}
            for d in logiqa.load(SHIPPED)[:N]]  # EleutherAI/logiqa's schema
    eleuther = hub_repo(tmp_path / "eleuther_logiqa", {"default": {"test": rows}})
    assert logiqa.load(with_files(logiqa=str(eleuther))) == logiqa.load(SHIPPED)[:N]


def test_asdiv_streamed(tmp_path):
    repo = hub_repo(tmp_path / "asdiv", {"default": {"validation": eleuther_asdiv()}}, fmt="jsonl")
    docs = asdiv.load(with_files(asdiv={"path": str(repo), "streaming": True}))
    native = asdiv.load(SHIPPED)[:N]
    assert [d["id"] for d in docs] == [None] * N  # EleutherAI/asdiv has no problem ID column
    assert [{**d, "id": None} for d in native] == docs


def test_tydiqa_one_dataset_holds_every_language(tmp_path, tok):
    dev = tydiqa_goldp(EVAL_DIR / "tydiqa" / "english_tydiqa_dev.json")
    for lang in tydiqa.LANGUAGES[1:]:
        dev += tydiqa_goldp(EVAL_DIR / "tydiqa" / "other_langs_dev" / f"{lang}_tydiqa_dev.json")
    train = tydiqa_goldp(EVAL_DIR / "tydiqa" / "english_tydiqa_train.json")
    repo = hub_repo(tmp_path / "tydiqa", {"secondary_task": {"train": train, "validation": dev}})
    hub = {"path": str(repo), "name": "secondary_task"}
    for langs in ("english", "all"):
        native_cfg = SHIPPED.model_copy(update={"limit": 5, "tydiqa_languages": langs})
        hub_cfg = native_cfg.model_copy(update={"task_files": EvalConfig(task_files={
            "tydiqa": hub, "tydiqa_train": hub, "tydiqa_other_langs": "nowhere"}).task_files})
        assert tydiqa.load(hub_cfg, tok) == tydiqa.load(native_cfg, tok)
    assert len(tydiqa.files(hub_cfg)) == 2  # one dev dataset (every language) and the train split


def test_hub_ids_get_the_benchmarks_split_and_config():
    c = EvalConfig(task_files={"truthfulqa": "hf://datasets/truthfulqa/truthful_qa@abc",
                               "boolq": {"path": "aps/super_glue"}, "asdiv": "hf://datasets/EleutherAI/asdiv/x.jsonl",
                               "tydiqa_train": "hf://datasets/google-research-datasets/tydiqa"})
    assert resolve_input(c, "truthfulqa", "-", truthfulqa.HUB_CONFIGS).spec == DatasetSpec(
        path="truthfulqa/truthful_qa", revision="abc", name="multiple_choice", split="validation")
    assert resolve_input(c, "boolq", "-", boolq.HUB_CONFIGS).spec == DatasetSpec(
        path="aps/super_glue", name="boolq", split="validation")
    assert resolve_input(c, "asdiv", "-").spec.split == "train"  # loose data_files land in "train"
    assert tydiqa.files(c)[-1].spec == DatasetSpec(
        path="google-research-datasets/tydiqa", name="secondary_task", split="train")
    assert resolve_input(EvalConfig(data_dir="/d", task_files={"boolq": "b.csv"}), "boolq", "-") == Path("/d/b.csv")
    with pytest.raises(ValueError, match="tydiqa_other_langs is a folder"):
        EvalConfig(task_files={"tydiqa_other_langs": "hf://datasets/a/b"})


# ---- errors and cache keys --------------------------------------------------------------------------
def test_a_bad_row_names_the_dataset_the_row_and_the_field(tmp_path):
    rows = super_glue_boolq(3)
    rows[1]["label"] = -1  # the SuperGLUE test split's hidden label
    repo = hub_repo(tmp_path / "bad_boolq", {"default": {"validation": rows}}, fmt="jsonl")
    with pytest.raises(EvalDataError, match=r"bad_boolq \[validation\] row 1: field 'label' must be 0 or 1, got -1"):
        boolq.load(with_files(boolq=str(repo)))
    rows = tydiqa_goldp(EVAL_DIR / "tydiqa" / "english_tydiqa_dev.json")[:3]
    rows[2]["answers"] = {"text": [], "answer_start": []}
    repo = hub_repo(tmp_path / "bad_tydiqa", {"default": {"validation": rows}})
    with pytest.raises(EvalDataError, match=r"bad_tydiqa \[validation\] row 2: field 'answers' must be"):
        tydiqa.dev_examples(with_files(tydiqa=str(repo)))
    rows = [{"question": r["question"], "mc1_targets": r["mc1_targets"]} for r in truthful_qa_mc()[:2]]
    repo = hub_repo(tmp_path / "no_mc2", {"default": {"validation": rows}})
    with pytest.raises(EvalDataError, match=r"row 0: field 'mc2_targets' is missing \(columns: \['mc1_targets', 'q"):
        truthfulqa.load(with_files(truthfulqa=str(repo)))


def test_uncached_hub_id_offline_fails_the_preflight_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = PipelineConfig.model_validate(
        {"eval": {"tasks": ["boolq"], "task_files": {"boolq": "hf://datasets/nobody/nothing"}}})
    with pytest.raises(UserError) as err:
        check_eval_files(cfg)
    msg = str(err.value)
    assert msg.startswith("hf://datasets/nobody/nothing [validation]: dataset 'nobody/nothing' is not in the local")
    assert "HF_HUB_OFFLINE=1" in msg and "hf download --repo-type dataset nobody/nothing" in msg


def test_eval_key_follows_the_datasets_content(tmp_path):
    folder = tmp_path / "boolq_saved"
    cfg = PipelineConfig.model_validate({"eval": {"tasks": ["boolq"], "task_files": {"boolq": str(folder)}}})

    def save(rows: list[dict]) -> None:
        datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))

    save(google_boolq())
    key = eval_key(cfg, {"model": "m"})
    assert eval_key(cfg, {"model": "m"}) == key  # same content, same key
    changed = google_boolq()
    changed[7]["answer"] = not changed[7]["answer"]
    save(changed)
    assert eval_key(cfg, {"model": "m"}) != key
    shipped = PipelineConfig.model_validate({"eval": {"tasks": ["boolq"]}})
    assert eval_key(shipped, {"model": "m"}) == eval_key(shipped, {"model": "m"})  # files: their sha256


def test_eval_key_follows_an_edited_hub_folder(tmp_path):
    # datasets' arrow cache of a local folder with a card would serve the edit stale; such folders are streamed
    repo = hub_repo(tmp_path / "boolq", {"default": {"validation": google_boolq()}})
    cfg = PipelineConfig.model_validate({"eval": {"tasks": ["boolq"], "task_files": {"boolq": str(repo)}}})
    key = eval_key(cfg, {"model": "m"})
    datasets.Dataset.from_list(google_boolq(N - 1)).to_parquet(str(repo / "data" / "validation-00000-of-00001.parquet"))
    assert eval_key(cfg, {"model": "m"}) != key
