"""forgetting-ray: token-level FORGETTING fine-tuning of LLMs at scale on Ray.

The public API is small: the config, the maths core, and one function per stage.  Imports are
lazy so that ``import forgetting_ray`` stays cheap (the CLI, Ray workers).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PipelineConfig": "forgetting_ray.config",
    "load_config": "forgetting_ray.config",
    "token_nll": "forgetting_ray.scoring",
    "partition": "forgetting_ray.selection",
    "partition_shards": "forgetting_ray.selection",
    "forgetting_loss": "forgetting_ray.losses",
    "lambda_schedule": "forgetting_ray.losses",
    "collate": "forgetting_ray.data.collate",
    "load_model": "forgetting_ray.models",
    "load_tokenizer": "forgetting_ray.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'forgetting_ray' has no attribute {name!r}")
