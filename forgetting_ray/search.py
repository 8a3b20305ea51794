"""The Tune search without Ray: the space's description and hash, each trial's config, the objective and its
direction, the online NLL ASHA compares, the seeded validation split, the concurrency default and the
best-trial choice.  Plain functions over the typed config, unit-tested without a cluster.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .config import PipelineConfig, TuneConfig, config_to_dict
from .constants import RAY_DATA_TASK_CPUS
from .errors import UserError
from .store import atomic_write_json, content_hash

SPACE_FILE = "search_space.json"
# A trial function holds this much CPU for itself (its fit and its evaluation ask for their own).
TRIAL_CPUS = 0.1
ONLINE_METRIC = "online_nll"  # what ASHA compares at its rungs (lower is better)
OBJECTIVE_METRIC = "objective"  # what the searcher and the best-trial choice use


class TuneInputError(UserError, ValueError):
    """A search that cannot run as configured (objective without its data, empty split, ...)."""


class SearchSpaceMismatch(UserError, RuntimeError):
    """A Tune run restarted in the same folder with a different search space."""


def resolve_objective(cfg: PipelineConfig) -> str:
    """'auto' -> eval_mean when evaluation is on, else val_nll; checks each has what it needs."""
    objective = cfg.tune.objective
    if objective == "auto":
        objective = "eval_mean" if cfg.eval.enabled else "val_nll"
    if objective == "val_nll" and cfg.tune.val_fraction <= 0:
        raise TuneInputError("tune.objective is val_nll but tune.val_fraction is 0: set tune.val_fraction > 0 "
                             "(e.g. 0.1) to hold out a validation split")
    if objective == "eval_mean" and not cfg.eval.tasks:
        raise TuneInputError("tune.objective is eval_mean but eval.tasks is empty")
    return objective


def objective_mode(objective: str) -> str:
    return "max" if objective == "eval_mean" else "min"


def space_spec(tc: TuneConfig) -> dict[str, Any]:
    """The search as data: ranges, schedules, searcher, scheduler, objective and seed.

    ``enabled`` and ``max_concurrent_trials`` are left out: they change how fast the search runs,
    not what it searches, so a restart may change them.
    """
    d = config_to_dict(tc)
    return {k: v for k, v in sorted(d.items()) if k not in ("enabled", "max_concurrent_trials")}


def space_hash(spec: dict[str, Any]) -> str:
    return content_hash(spec)


def check_search_space(folder: str | Path, spec: dict[str, Any]) -> None:
    """Record the space on the first run; a restart with another space is an error naming both hashes."""
    path = Path(folder) / SPACE_FILE
    new = space_hash(spec)
    if path.is_file():
        old_doc = json.loads(path.read_text())
        old = old_doc.get("hash")
        if old != new:
            changed = sorted(k for k in set(old_doc.get("spec", {})) | set(spec)
                             if old_doc.get("spec", {}).get(k) != spec.get(k))
            raise SearchSpaceMismatch(
                f"Tune search in {path.parent} was started with search space {old}; this configuration's "
                f"space is {new} (changed: tune.{', tune.'.join(changed)}). A restart resumes the old "
                f"search, so it must keep the space: restore the old tune settings, or start a fresh "
                f"search by deleting {path.parent} or choosing another run_dir."
            )
        return
    atomic_write_json(path, {"hash": new, "spec": spec})


def trial_config(cfg: PipelineConfig, params: dict[str, Any], *, report_every: int | None = None) -> PipelineConfig:
    """The pipeline config of one trial: the base config with the drawn rho, schedule, t_max, t_min, lr.

    The strategy is always 'forgetting' (the search tunes its knobs); a drawn t_min above the drawn
    t_max is clipped to it, so every point of the box is a valid schedule.
    """
    t_max = float(params.get("t_max", cfg.training.t_max))
    t_min = min(float(params.get("t_min", cfg.training.t_min)), t_max)
    training = {
        "strategy": "forgetting",
        "lambda_schedule": params.get("lambda_schedule", cfg.training.lambda_schedule),
        "t_max": t_max,
        "t_min": t_min,
        "lr": float(params.get("lr", cfg.training.lr)),
    }
    if report_every is not None:
        training["report_every"] = report_every
    data = config_to_dict(cfg)
    data["training"].update(training)
    data["selection"]["rho"] = float(params.get("rho", cfg.selection.rho))
    return PipelineConfig.model_validate(data)


def online_nll(metrics: dict[str, Any]) -> float | None:
    """NLL of every response token of a step, from its per-class means and counts (None if empty)."""
    n_pos, n_neg = float(metrics.get("n_pos", 0)), float(metrics.get("n_neg", 0))
    if n_pos + n_neg <= 0:
        return None
    total = float(metrics.get("pos_nll", 0.0)) * n_pos + float(metrics.get("neg_nll", 0.0)) * n_neg
    return total / (n_pos + n_neg)


def in_validation(sample_ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Seeded membership of the validation split, from the sample id alone (stable across rho and runs)."""
    if fraction <= 0:
        return np.zeros(len(sample_ids), dtype=bool)
    cut = int(fraction * 2**64)
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{s}".encode(), digest_size=8).digest(), "big") < cut
                     for s in sample_ids], dtype=bool)


def trial_cpus(cfg: PipelineConfig) -> float:
    """CPUs one trial holds at its peak: its own process, plus its fit's workers or, for the eval_mean
    objective on the Ray backend, its evaluation actors and one Ray Data task (whichever is larger)."""
    r, e = cfg.resources, cfg.eval
    train = r.num_workers * r.cpus_per_worker
    evaluate = 0.0
    if resolve_objective(cfg) == "eval_mean" and e.backend == "ray" and not e.num_gpus_per_actor:
        evaluate = e.concurrency * e.num_cpus_per_actor + RAY_DATA_TASK_CPUS
    return TRIAL_CPUS + max(train, evaluate)


def default_max_concurrent(cfg: PipelineConfig, cluster: dict[str, float]) -> int:
    """How many trials the cluster holds at once (:func:`trial_cpus` each, and num_workers GPUs on GPU)."""
    r = cfg.resources
    n = int(cluster.get("CPU", 0) // trial_cpus(cfg))
    if r.use_gpu:
        n = min(n, int(cluster.get("GPU", 0) // r.num_workers))
    return max(1, n)


def pick_best(trials: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The finished trial with the best finite objective (ties: the earlier trial id)."""
    done = [t for t in trials if t.get("objective") is not None and math.isfinite(t["objective"])]
    if not done:
        return None
    sign = -1.0 if mode == "max" else 1.0
    return min(done, key=lambda t: (sign * t["objective"], t["trial_id"]))
