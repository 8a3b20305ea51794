"""Stage recipes: the only modules that touch Ray.  Each exposes one ``run_*`` function.

Imports are lazy so that importing one stage does not pull in the others (or Ray).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
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
