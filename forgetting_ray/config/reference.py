"""The README's config reference, generated from the models (``make readme``; tests/test_readme.py)."""

from __future__ import annotations

import json

from pydantic import BaseModel

from .loading import config_to_dict
from .pipeline import PipelineConfig


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
