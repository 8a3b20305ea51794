"""The evaluation suite: which benchmarks, on which data, with which actors."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from .base import Section
from .data import HF_DATASETS_SCHEME, DatasetSpec, parse_dataset_uri


class EvalConfig(Section):
    enabled: bool = Field(True, description="Evaluate exported models.")
    tasks: list[Literal["truthfulqa", "boolq", "logiqa", "tydiqa", "asdiv"]] = Field(
        default_factory=lambda: ["truthfulqa", "boolq", "logiqa", "tydiqa", "asdiv"],
        description="Benchmarks to run.",
    )
    data_dir: str | None = Field(
        None,
        description="Folder holding the benchmark files (one sub-folder per task); None = the files shipped "
        "inside the package (forgetting_ray/eval/data, each with its licence).",
    )
    limit: float | None = Field(
        None,
        gt=0,
        description="Seeded subset per task: a count (>= 1) or a fraction (< 1, e.g. 0.99 as the paper).",
    )
    seed: int = Field(42, description="Seed of the subsets.")
    batch_size: int = Field(8, gt=0, description="Examples per forward batch.")
    tydiqa_languages: Literal["all", "english"] = Field("english", description="TyDiQA languages.")
    concurrency: int = Field(1, gt=0, description="Number of evaluation actors.")
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per evaluation actor.")
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per evaluation actor.")
    limit_mode: Literal["first", "random"] = Field(
        "first",
        description="How 'limit' picks documents: the first ones in file order (lm-eval, the paper's "
        "0.99) or a sample seeded with 'seed'.",
    )
    backend: Literal["ray", "local"] = Field(
        "ray", description="'ray' = Ray Data actor pool (concurrency actors); 'local' = in the calling process."
    )
    harness: Literal["native", "lm-eval"] = Field(
        "native",
        description="'native' = this package's scorer; 'lm-eval' = lm-evaluation-harness (if installed) on "
        "task configs built from the same local files (BoolQ, TruthfulQA, LogiQA, ASDiv only).",
    )
    prefix_reuse: bool = Field(
        True, description="Run a question's shared context once and score every choice from its KV cache."
    )
    chat_template: bool = Field(
        False, description="Wrap each prompt in the tokenizer's chat template as one user turn (error if it has none)."
    )
    task_files: dict[str, str | DatasetSpec] = Field(
        default_factory=dict,
        description="Override a benchmark's data: a file (relative to data_dir unless absolute), or a dataset read "
        "with datasets.load_dataset (normal HF cache): 'hf://datasets/<owner>/<name>[@revision][/file]', a local "
        "dataset folder, or a mapping {path, name, split, revision, data_files, streaming}. A dataset has the "
        "benchmark's Hub schema (google/boolq or super_glue boolq, truthful_qa multiple_choice, lucasmccabe/logiqa "
        "or EleutherAI/logiqa, EleutherAI/asdiv, tydiqa secondary_task) and, unless named, the split it is scored "
        "on. Keys: boolq, truthfulqa, logiqa, asdiv, tydiqa (dev; one dataset holds every language), tydiqa_train, "
        "tydiqa_other_langs (a folder of files only).",
    )
    tydiqa_decoding: Literal["greedy", "sample"] = Field(
        "greedy", description="TyDiQA decoding: greedy, or temperature-1 sampling (the paper's; seeded here)."
    )
    tydiqa_max_context_tokens: int = Field(512, gt=0, description="Cut TyDiQA passages to this many tokens.")
    tydiqa_max_new_tokens: int = Field(50, gt=0, description="TyDiQA generation length limit.")
    asdiv_mode: Literal["generate", "loglikelihood", "both"] = Field(
        "generate",
        description="ASDiv metric: greedy generation exact match ('acc'), lm-eval's loglikelihood "
        "is_greedy ('is_greedy'), or both.",
    )
    asdiv_max_new_tokens: int = Field(32, gt=0, description="ASDiv generation length limit (stops at a newline).")

    # The split a dataset entry of task_files is read from when it names none.
    DATASET_SPLITS: ClassVar[dict[str, str]] = {
        "boolq": "validation", "truthfulqa": "validation", "logiqa": "test", "asdiv": "validation",
        "tydiqa": "validation", "tydiqa_train": "train",
    }

    @field_validator("task_files")
    @classmethod
    def _known_task_files(cls, v: dict[str, str | DatasetSpec]) -> dict[str, str | DatasetSpec]:
        known = set(cls.DATASET_SPLITS) | {"tydiqa_other_langs"}
        unknown = sorted(set(v) - known)
        if unknown:
            raise ValueError(f"unknown task_files key(s) {unknown}; known: {sorted(known)}")
        for key, entry in v.items():
            hub = isinstance(entry, str) and entry.startswith(HF_DATASETS_SCHEME)
            if key == "tydiqa_other_langs" and (hub or isinstance(entry, DatasetSpec)):
                raise ValueError("tydiqa_other_langs is a folder of <language>_tydiqa_dev.json files; a dataset "
                                 "holding every language goes under 'tydiqa'")
            if hub:
                parse_dataset_uri(entry)  # a malformed hf:// string fails at load time, with the field named
        return {k: cls.task_dataset(k, e) if isinstance(e, DatasetSpec) else e for k, e in v.items()}

    @classmethod
    def task_dataset(cls, key: str, spec: DatasetSpec) -> DatasetSpec:
        """``spec`` with the benchmark's own split unless it names one (loose data_files land in "train")."""
        if "split" in spec.model_fields_set or key not in cls.DATASET_SPLITS:
            return spec
        split = "train" if isinstance(spec.data_files, (str, list)) else cls.DATASET_SPLITS[key]
        return spec.model_copy(update={"split": split})

    @field_validator("limit")
    @classmethod
    def _limit_fraction_or_count(cls, v: float | None) -> float | None:
        if v is not None and v >= 1 and not float(v).is_integer():
            raise ValueError(f"limit must be a fraction < 1 or a whole count, got {v}")
        return v
