"""The corpus and the prepare stage: files, dataset folders and Hub datasets, and how they are rendered."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from .base import Section

HF_DATASETS_SCHEME = "hf://datasets/"


class DatasetSpec(Section):
    """A dataset read through Hugging Face ``datasets``: a Hub id, or a local dataset folder."""

    path: str = Field(
        ...,
        description="Hub dataset id ('owner/name'), or a local folder: the output of save_to_disk, or data "
        "files with a dataset card (README.md with a YAML header), laid out like a Hub dataset repository.",
    )
    name: str | None = Field(None, description="Dataset configuration (subset) name.")
    split: str = Field("train", description="Split to read.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="Files inside the dataset repository, as datasets.load_dataset takes them."
    )
    streaming: bool = Field(
        False, description="Stream the rows (datasets' IterableDataset) instead of converting the whole dataset first."
    )


def parse_dataset_uri(uri: str) -> DatasetSpec:
    """``hf://datasets/owner/name[@revision][/path/in/repo]`` -> :class:`DatasetSpec` (a path = data_files)."""
    rest = uri[len(HF_DATASETS_SCHEME):].strip("/")
    parts = rest.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"{uri!r}: expected hf://datasets/<owner>/<name>[@revision][/file-in-repo]")
    repo, revision = parts[1].split("@", 1) if "@" in parts[1] else (parts[1], None)
    files = "/".join(parts[2:]) or None
    return DatasetSpec(path=f"{parts[0]}/{repo}", revision=revision or None, data_files=files)


CorpusInput = str | DatasetSpec


def _check_corpus_inputs(entries: list[CorpusInput]) -> list[CorpusInput]:
    for entry in entries:
        if isinstance(entry, str) and entry.startswith(HF_DATASETS_SCHEME):
            parse_dataset_uri(entry)  # fail at load time, with the field named, not in the middle of a run
    return entries


class DataConfig(Section):
    train_files: list[CorpusInput] = Field(
        default_factory=list,
        description="Training corpus: files (jsonl, json, parquet or FLAN CoT tsv; globs allowed), local dataset "
        "folders, 'hf://datasets/<owner>/<name>[@revision][/file]' strings, or mappings {path, name, split, "
        "revision, data_files, streaming} read with datasets.load_dataset (normal HF cache).",
    )
    reference_files: list[CorpusInput] = Field(
        default_factory=list,
        description="Optional separate corpus for the reference model (same forms as train_files). When empty, "
        "the reference subset is split off the training files (reference_fraction or reference_count).",
    )
    format: Literal["auto", "jsonl", "json", "parquet", "flan_cot_tsv"] = Field(
        "auto", description="File format; 'auto' picks it from the file suffix."
    )
    schema_: Literal["auto", "messages", "prompt_completion"] = Field(
        "auto",
        alias="schema",
        description="Record schema: 'messages' (list of {role, content}) or 'prompt_completion'; "
        "'auto' detects it per record.",
    )
    column_map: dict[str, str] = Field(
        default_factory=dict,
        description="Rename source columns to the canonical names 'messages', 'prompt', "
        "'completion', 'source' (e.g. {answer: completion}).",
    )
    template: Literal["auto", "chat_template", "tulu"] = Field(
        "auto",
        description="Rendering: the tokenizer's chat template, the Tulu template of docs/method.md §2.2, "
        "or 'auto' (chat template when the tokenizer has one, else Tulu).",
    )
    max_length: int = Field(2048, gt=1, description="Truncate rendered samples to this many tokens.")
    max_samples: int | None = Field(
        None, gt=0, description="Keep only the first N records of the corpus (after reading, file order)."
    )
    reference_fraction: float | None = Field(
        0.2, gt=0, lt=1, description="Fraction of the corpus held out for the reference model."
    )
    reference_count: int | None = Field(
        None, gt=0, description="Number of samples held out for the reference model (overrides the fraction)."
    )
    split_seed: int = Field(42, description="Seed of the deterministic reference/training split.")
    source_field: str = Field(
        "source", description="Record field naming the data source; defaults to the file stem."
    )

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @field_validator("train_files", "reference_files")
    @classmethod
    def _corpus_inputs(cls, v: list[CorpusInput]) -> list[CorpusInput]:
        return _check_corpus_inputs(v)
