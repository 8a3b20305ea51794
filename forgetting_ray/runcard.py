"""The run card: what a run's numbers depend on, as content hashes, package versions and seeds.

Written as ``<run_dir>/run_card.json`` and logged to the parent MLflow run.  Data tables and score
shards are hashed by content; exported models by a hash over every file; the base model by its
config hash and weight-file sizes only (hashing tens of GB of weights on every run costs minutes,
and the export hashes already pin what was trained).
"""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import PipelineConfig, config_to_dict
from .exports import model_identity
from .store import atomic_write_json, content_hash, file_sha256, portable, remote_of, run_root, tree_sha256
from .tracking import redact

PACKAGES = ("forgetting-ray", "torch", "ray", "transformers", "deepspeed", "peft", "accelerate", "datasets",
            "tokenizers", "safetensors", "mlflow", "optuna", "numpy", "pyarrow", "pydantic")
CARD_FILE = "run_card.json"


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def hash_path(path: str | Path | None) -> str | None:
    """sha256 of a file, or of every file (name + content) under a folder; None when it does not exist."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    if p.is_dir():
        return tree_sha256(p)
    return None


def redacted(obj: Any, prefix: str = "") -> Any:
    """A config dict with secrets hidden (the card is a file and an MLflow artifact)."""
    if isinstance(obj, dict):
        return {k: redacted(v, f"{prefix}{k}.") for k, v in obj.items()}
    return redact(prefix.rstrip("."), obj)


def seeds(cfg: PipelineConfig) -> dict[str, int]:
    return {"seed": cfg.seed, "data.split_seed": cfg.data.split_seed, "reference.seed": cfg.reference.seed,
            "training.seed": cfg.training.seed, "eval.seed": cfg.eval.seed, "tune.seed": cfg.tune.seed}


class RunCard:
    """Accumulates a run's lineage stage by stage; ``write`` puts it on disk (atomically)."""

    def __init__(self, cfg: PipelineConfig, until: str | None = None):
        self.card: dict[str, Any] = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_dir": portable(run_root(cfg.run_dir)),
            "config_hash": content_hash(config_to_dict(cfg), length=64),
            "config": redacted(config_to_dict(cfg)),  # what `forgetting-ray reproduce` reruns
            "until": until,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "packages": package_versions(),
            "seeds": seeds(cfg),
            "data": {},
            "models": {"base": model_identity(cfg.model.name_or_path, revision=cfg.model.revision,
                                              tokenizer=cfg.model.tokenizer)},
            "scores": {},
            "stages": {},
        }
        self.path = run_root(cfg.run_dir) / CARD_FILE

    def add_data(self, prep: Any) -> None:
        self.card["data"] = {"prepare_key": prep.key, "train_table": hash_path(prep.train_path),
                             "reference_table": hash_path(prep.reference_path),
                             "manifest": hash_path(prep.manifest_path)}

    def add_model(self, name: str, export_dir: str | Path | None, sha256: str | None = None, **extra: Any) -> None:
        if export_dir is None:
            return
        uri = remote_of(export_dir) or Path(export_dir).resolve().as_uri()
        # the weights alone: the export's manifest also names where the run kept its table
        weights = tree_sha256(export_dir, "*.safetensors") if Path(export_dir).is_dir() else None
        self.card["models"][name] = {"uri": uri, "sha256": sha256 or hash_path(export_dir), "weights_sha256": weights,
                                     **extra}

    def add_scores(self, score: Any) -> None:
        shards = {p.name: file_sha256(p) for p in score.shard_paths() if p.is_file()}
        self.card["scores"] = {"key": score.key, "dir": portable(Path(score.dir).resolve()), "n_shards": score.n_shards,
                               "n_response_tokens": score.n_response_tokens, "shards_sha256": content_hash(shards, 64),
                               "nodes": list(score.nodes)}

    def add_stage(self, name: str, info: dict[str, Any]) -> None:
        self.card["stages"][name] = info

    def write(self) -> Path:
        return atomic_write_json(self.path, self.card)
