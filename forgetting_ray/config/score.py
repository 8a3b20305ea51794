"""Influence scoring and the global top-rho selection."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Section


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
