"""Typed configuration: one pydantic model per stage, composed into :class:`PipelineConfig`.

This package is the single source of truth for the YAML files, the dotted CLI overrides
(``training.lr=2e-5``) and the README's config reference.  Defaults follow the paper
(docs/method.md §3, §5-§7).  It imports nothing else from the package but ``errors``.

One module per concern: ``base`` (what every section shares), ``model``, ``data``, ``finetune``
(reference and training), ``score`` (scoring and selection), ``eval``, ``tune``, ``pipeline`` (the whole
run, tracking and resources), ``loading`` (YAML, overrides, dumps) and ``reference`` (the README table).
Callers import from the package: the names below are its API.
"""

from __future__ import annotations

from .base import ConfigError, LambdaSchedule, Section
from .data import HF_DATASETS_SCHEME, CorpusInput, DataConfig, DatasetSpec, parse_dataset_uri
from .eval import EvalConfig
from .finetune import DeepSpeedSettings, FinetuneConfig, LoraSettings, ReferenceConfig, TrainingConfig
from .loading import apply_overrides, config_to_dict, dump_config, flatten, load_config, parse_override
from .model import ModelConfig
from .pipeline import STORAGE_ENV, PipelineConfig, ResourcesConfig, TrackingConfig
from .reference import config_reference_markdown
from .score import ScoringConfig, SelectionConfig
from .tune import SearchRange, TuneConfig

__all__ = [
    "HF_DATASETS_SCHEME",
    "STORAGE_ENV",
    "ConfigError",
    "CorpusInput",
    "DataConfig",
    "DatasetSpec",
    "DeepSpeedSettings",
    "EvalConfig",
    "FinetuneConfig",
    "LambdaSchedule",
    "LoraSettings",
    "ModelConfig",
    "PipelineConfig",
    "ReferenceConfig",
    "ResourcesConfig",
    "ScoringConfig",
    "SearchRange",
    "Section",
    "SelectionConfig",
    "TrackingConfig",
    "TrainingConfig",
    "TuneConfig",
    "apply_overrides",
    "config_reference_markdown",
    "config_to_dict",
    "dump_config",
    "flatten",
    "load_config",
    "parse_dataset_uri",
    "parse_override",
]
