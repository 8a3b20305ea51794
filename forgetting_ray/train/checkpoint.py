"""Resumable training state: what a checkpoint holds besides the engine's own shards.

A checkpoint folder (one per save, merged by Ray Train from every rank) holds
``<tag>/`` (DeepSpeed shards of every rank, or rank 0's DDP state), ``forgetting_state.json``
(position in the data, lambda step, guardrail state, config fingerprint) and ``metrics.jsonl``
(every optimizer step so far).  Resume restores all of it exactly or refuses: a checkpoint written
by another configuration or base model is an error, never a silent partial load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..store import atomic_write_json, atomic_write_text, content_hash

STATE_FILE = "forgetting_state.json"
METRICS_FILE = "metrics.jsonl"
FORMAT_VERSION = 1

# Fields of FinetuneConfig/TrainingConfig that do not change the numbers or the shard layout.
NEUTRAL_FIELDS = frozenset({
    "checkpoint_every", "report_every", "export", "export_dtype", "export_max_shard_size", "gradient_checkpointing",
    "max_failures", "keep_checkpoints", "resume_from",
})
NEUTRAL_DEEPSPEED_FIELDS = frozenset({"max_live_parameters", "max_reuse_distance", "reduce_bucket_size"})  # memory, not the numbers


class CheckpointMismatchError(UserError, RuntimeError):
    """A checkpoint from a different run configuration or base model."""


@dataclass
class TrainState:
    global_step: int = 0  # optimizer steps done; lambda(k) uses this, never the in-epoch micro-step
    epoch: int = 0
    micro_batches_in_epoch: int = 0  # global micro-batches of `epoch` consumed (skipped on resume)
    lambda_multiplier: float = 1.0  # halved by the guardrail's back-off
    guardrail: dict[str, Any] = field(default_factory=dict)
    stop_reason: str | None = None
    microbatches_without_positive: int = 0
    has_weights: bool = True  # False for the light final report of a run without checkpoint_every
    resumed_at: list[int] = field(default_factory=list)  # global steps this run was restored at

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainState":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def fingerprint_parts(
    *,
    stage: str,
    finetune: dict[str, Any],
    model: dict[str, Any],
    table_hash: str,
    world_size: int,
) -> dict[str, Any]:
    """Everything a resumed run must share with the run that wrote the checkpoint."""
    return {
        "format": FORMAT_VERSION,
        "stage": stage,
        "finetune": {k: _without_neutral(k, v) for k, v in sorted(finetune.items()) if k not in NEUTRAL_FIELDS},
        "model": model,  # exports.model_identity of the base model (and tokenizer)
        "table": table_hash,
        "world_size": world_size,  # DeepSpeed shards and the data split depend on it
    }


def _without_neutral(key: str, value: Any) -> Any:
    if key == "deepspeed" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in NEUTRAL_DEEPSPEED_FIELDS}
    return value


def fingerprint(parts: dict[str, Any]) -> str:
    return content_hash(parts)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: checkpoint has {a!r}, this run has {b!r}"]


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: str | Path) -> None:
    """Raise :class:`CheckpointMismatchError` listing every differing field."""
    if fingerprint(saved) == fingerprint(current):
        return
    lines = _diff(saved, current)
    raise CheckpointMismatchError(
        f"checkpoint {where} was written by a different run and cannot be resumed here:\n  "
        + "\n  ".join(lines or ["fingerprints differ"])
        + "\nStart a fresh run (another run directory / storage path) or restore the original configuration."
    )


def write_state(folder: str | Path, state: TrainState, parts: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """Rank 0's part of a checkpoint: the JSON state and the metrics history."""
    folder = Path(folder)
    atomic_write_json(
        folder / STATE_FILE,
        {"state": state.to_json(), "fingerprint": fingerprint(parts), "fingerprint_parts": parts},
    )
    atomic_write_text(folder / METRICS_FILE, "".join(json.dumps(m, sort_keys=True) + "\n" for m in history))


def read_state(
    folder: str | Path, current_parts: dict[str, Any] | None = None
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Read and (when ``current_parts`` is given) verify a checkpoint's state and history."""
    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.is_file():
        raise CheckpointMismatchError(f"{folder} is not a forgetting-ray checkpoint: {STATE_FILE} is missing")
    doc = json.loads(path.read_text())
    if current_parts is not None:
        check_compatible(doc["fingerprint_parts"], current_parts, folder)
    history: list[dict[str, Any]] = []
    mpath = folder / METRICS_FILE
    if mpath.is_file():
        history = [json.loads(line) for line in mpath.read_text().splitlines() if line.strip()]
    return TrainState.from_json(doc["state"]), history


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"
