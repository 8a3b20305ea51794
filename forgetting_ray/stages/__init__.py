"""Stage recipes, one module per stage: prepare, train (reference and fine-tunes), score, partition, evaluate,
tune.  Each exposes one ``run_*`` function that reads top to bottom.

Imports are lazy so that importing one stage does not pull in the others (or Ray).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run_prepare": "forgetting_ray.stages.prepare",
    "PrepareResult": "forgetting_ray.stages.prepare",
    "run_finetune": "forgetting_ray.stages.train",
    "run_tune": "forgetting_ray.stages.tune",
    "run_eval": "forgetting_ray.stages.evaluate",
    "run_score": "forgetting_ray.stages.score",
    "ScoreResult": "forgetting_ray.stages.score",
    "run_partition": "forgetting_ray.stages.partition",
    "PartitionResult": "forgetting_ray.stages.partition",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'forgetting_ray.stages' has no attribute {name!r}")
