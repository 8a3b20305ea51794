"""Corpus inputs beyond local files (forgetting_ray.data.sources): Hub-style dataset folders, save_to_disk
folders, ``hf://datasets/...`` strings and mappings, all read through real Hugging Face ``datasets``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest

from forgetting_ray.cli import main
from forgetting_ray.config import ConfigError, DatasetSpec, DataConfig, PipelineConfig, load_config, parse_dataset_uri
from forgetting_ray.stages.prepare import run_prepare
from forgetting_ray.data.readers import DataError, read_records, resolve_inputs
from forgetting_ray.data.sources import DatasetSource, FileSource, is_local_dataset

from conftest import DOLLY_FILE, FLAN_DIR

DOLLY = DataConfig(column_map={"answer": "completion"})
CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.jsonl
  - split: test
    path: data/test-*.jsonl
---
# A corpus laid out like a Hub dataset repository
"""


def dolly_rows(n: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in DOLLY_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:n] if n else rows


def hub_repo(root: Path, train: list[dict], test: list[dict] | None = None) -> Path:
    """A folder as `hf download --repo-type dataset` leaves it: a dataset card and data files under data/."""
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text(CARD, encoding="utf-8")
    for split, rows in (("train", train), ("test", test or train[:3])):
        with open(root / "data" / f"{split}-00000-of-00001.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    return root


def ids(records) -> list[str]:
    return [r.sample_id for r in records]


# ------------------------------------------------------------------------------------------------
# naming datasets in the config
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri, expected", [
    ("hf://datasets/acme/corpus", DatasetSpec(path="acme/corpus")),
    ("hf://datasets/acme/corpus@v1.2", DatasetSpec(path="acme/corpus", revision="v1.2")),
    ("hf://datasets/acme/corpus@main/sub/train.json",
     DatasetSpec(path="acme/corpus", revision="main", data_files="sub/train.json")),
])
def test_hf_uri_becomes_a_dataset_spec(uri, expected):
    assert parse_dataset_uri(uri) == expected


def test_a_malformed_hf_uri_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"data\.train_files.*hf://datasets/<owner>/<name>"):
        load_config(None, ["data.train_files=[hf://datasets/only-owner]"])


def test_yaml_mapping_entries_validate_and_reject_unknown_keys(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("data:\n  train_files:\n    - {path: acme/corpus, name: en, split: validation, revision: abc, "
                    "data_files: [a.json]}\n    - local/*.jsonl\n", encoding="utf-8")
    spec, pattern = load_config(good).data.train_files
    assert isinstance(spec, DatasetSpec) and (spec.name, spec.split, spec.data_files) == ("en", "validation", ["a.json"])
    assert pattern == "local/*.jsonl"
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train_files:\n    - {path: acme/corpus, splt: train}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml.*DatasetSpec\.splt: unknown field"):
        load_config(bad)


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def test_hub_layout_folder_reads_like_the_file_it_was_made_from(tmp_path):
    repo = hub_repo(tmp_path / "repo", dolly_rows())
    assert is_local_dataset(repo)
    [source] = resolve_inputs([str(repo)])
    assert isinstance(source, DatasetSource)
    from_dataset = list(read_records([source], DOLLY))
    from_file = list(read_records([DOLLY_FILE], DOLLY))
    assert ids(from_dataset) == ids(from_file) and len(from_file) == 151
    assert from_dataset[7].origin == f"{repo.resolve()} [train] row 7"
    assert {r.source for r in from_dataset} == {"repo"}  # the dataset's name, as a file's stem


def test_split_data_files_streaming_and_save_to_disk_give_the_same_records(tmp_path):
    rows = dolly_rows(20)
    repo = hub_repo(tmp_path / "repo", rows, test=rows[5:9])
    expected = ids(read_records([DOLLY_FILE], DOLLY, limit=20))
    test_split = list(read_records(resolve_inputs([{"path": str(repo), "split": "test"}]), DOLLY))
    assert ids(test_split) == expected[5:9]
    by_files = resolve_inputs([{"path": str(repo), "data_files": "data/test-*.jsonl", "streaming": True}])
    assert ids(read_records(by_files, DOLLY)) == expected[5:9]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4])}).save_to_disk(str(tmp_path / "saved_dict"))
    assert ids(read_records(resolve_inputs([str(tmp_path / "saved")]), DOLLY)) == expected
    assert ids(read_records(resolve_inputs([str(tmp_path / "saved_dict")]), DOLLY)) == expected[:4]
    with pytest.raises(DataError, match=r"saved_dict \[validation\]: no split 'validation' \(has \['train'\]\)"):
        list(read_records(resolve_inputs([{"path": str(tmp_path / "saved_dict"), "split": "validation"}]), DOLLY))


def test_a_plain_folder_with_a_readme_is_still_a_folder_of_files():
    # examples/data/flan_v2_cot has a provenance README without a YAML header: not a dataset card
    sources = resolve_inputs([str(FLAN_DIR)])
    assert all(isinstance(s, FileSource) for s in sources) and len(sources) == 4


def test_bad_row_names_dataset_row_and_field(tmp_path):
    rows = dolly_rows(6)
    rows[4] = {"prompt": rows[4]["prompt"]}  # no answer
    repo = hub_repo(tmp_path / "repo", rows)
    with pytest.raises(DataError, match=r"repo \[train\] row 4: missing field 'completion'"):
        list(read_records(resolve_inputs([str(repo)]), DOLLY))


@pytest.mark.parametrize("body", ["", "\n\n  \n"])
def test_an_empty_file_is_an_error_naming_it(tmp_path, body):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(body, encoding="utf-8")
    with pytest.raises(DataError, match=rf"{empty}: no records \(the file is empty or holds only blank lines\)"):
        list(read_records([DOLLY_FILE, empty], DOLLY))


def test_uncached_hub_dataset_offline_is_one_clear_error(tmp_path, capsys, monkeypatch, tiny_llama):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    rc = main(["prepare", "examples/demo.yaml", f"run_dir={tmp_path}/run", "tracking.enabled=false",
               f"model.name_or_path={tiny_llama}", "data.train_files=[hf://datasets/nobody/nothing-here]"])
    *before, err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and before == ["== prepare"]  # the stage's start line, then one error line, no traceback
    assert err.startswith("error: hf://datasets/nobody/nothing-here [train]: dataset 'nobody/nothing-here' is "
                          "not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it")
    assert "hf download --repo-type dataset nobody/nothing-here" in err
    assert not os.path.exists(tmp_path / "run" / "prepare")


# ------------------------------------------------------------------------------------------------
# prepare over a dataset
# ------------------------------------------------------------------------------------------------
def test_prepare_from_a_dataset_matches_the_file_and_keys_on_content(tmp_path, tiny_plain_tokenizer_dir):
    def prepared(run: str, entry) -> tuple[str, list[str]]:
        cfg = PipelineConfig.model_validate({
            "run_dir": str(tmp_path / run), "model": {"name_or_path": "t", "tokenizer": str(tiny_plain_tokenizer_dir)},
            "data": {"train_files": [entry], "column_map": {"answer": "completion"}, "max_length": 4096,
                     "reference_count": 10}})
        res = run_prepare(cfg)
        return res.key, res.read_manifest()["sets"]["train"]["sample_ids"]

    rows = dolly_rows(40)
    file = tmp_path / "dolly40.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    key_file, ids_file = prepared("a", str(file))
    repo = hub_repo(tmp_path / "repo", rows)
    key_ds, ids_ds = prepared("b", str(repo))
    assert ids_ds == ids_file and len(ids_ds) >= 25  # 10 held out for the reference, a few too long
    assert prepared("b", str(repo))[0] == key_ds  # unchanged content: the finished folder is reused
    (repo / "data" / "train-00000-of-00001.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows[:39]), encoding="utf-8")
    assert prepared("b", str(repo))[0] != key_ds  # changed content: a new key
