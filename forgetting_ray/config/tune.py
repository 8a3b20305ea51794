"""The Ray Tune search over rho, lambda and the learning rate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import LambdaSchedule, Section


class SearchRange(Section):
    low: float = Field(description="Lower bound.")
    high: float = Field(description="Upper bound.")
    log: bool = Field(False, description="Sample on a log scale.")

    @model_validator(mode="after")
    def _ordered(self) -> "SearchRange":
        if not self.low < self.high:
            raise ValueError(f"empty or inverted range: low={self.low} must be < high={self.high}")
        return self


class TuneConfig(Section):
    enabled: bool = Field(False, description="Run a Ray Tune search after scoring.")
    num_samples: int = Field(8, gt=0, description="Number of trials.")
    rho: SearchRange = Field(
        default_factory=lambda: SearchRange(low=0.5, high=0.9), description="Search range for rho."
    )
    t_max: SearchRange = Field(
        default_factory=lambda: SearchRange(low=0.05, high=0.5), description="Search range for t_max."
    )
    lambda_schedules: list[LambdaSchedule] = Field(
        default_factory=lambda: ["linear", "constant", "cosine"], min_length=1, description="Schedules to try."
    )
    lr: SearchRange | None = Field(None, description="Optional learning-rate range.")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="Trial scheduler.")
    searcher: Literal["random", "optuna"] = Field("random", description="Search algorithm.")
    objective: Literal["auto", "eval_mean", "val_nll"] = Field(
        "auto",
        description="Trial objective: mean headline score of eval.tasks on a seeded dev subset (eval_limit per "
        "task; higher is better), or the NLL of every response token of a held-out validation split (val_fraction; lower is "
        "better). 'auto' = eval_mean when eval.enabled, else val_nll.",
    )
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="None = as many as the cluster's CPUs/GPUs hold (num_workers x cpus_per_worker each)."
    )
    t_min: SearchRange | None = Field(
        None,
        description="Optional search range for t_min (None = training.t_min); a draw above the trial's t_max "
        "is clipped to it.",
    )
    grace_period: int = Field(
        1, gt=0, description="ASHA: optimizer steps every trial runs before it can be stopped."
    )
    reduction_factor: int = Field(2, gt=1, description="ASHA: keep the best 1/reduction_factor at each rung.")
    report_every: int | None = Field(
        None,
        gt=0,
        description="Optimizer steps between a trial's reports to Tune (ASHA's decision points); None = "
        "training.report_every.",
    )
    eval_limit: int = Field(
        50, gt=0, description="Objective eval_mean: documents per benchmark in the seeded dev subset."
    )
    val_fraction: float = Field(
        0.1,
        ge=0,
        lt=0.5,
        description="Fraction of the training samples (seeded by sample id) held out of every trial's training "
        "for the val_nll objective; 0 = none (objective eval_mean only).",
    )
    seed: int = Field(42, description="Seed of the searcher and of the validation split.")
    max_trial_failures: int = Field(
        2,
        ge=0,
        description="Times Tune restarts a trial whose process or node died (a node lost on a cluster, a worker "
        "the autoscaler took away); the restarted trial reuses its partition and resumes its fine-tune from the "
        "latest checkpoint in storage when it wrote one. 0 = such a trial ends in error.",
    )

    @field_validator("rho")
    @classmethod
    def _rho_range(cls, v: SearchRange) -> SearchRange:
        if not (0.0 < v.low and v.high <= 1.0):
            raise ValueError(f"rho range must lie in (0, 1], got low={v.low} high={v.high}")
        return v

    @field_validator("t_max", "t_min")
    @classmethod
    def _lambda_range(cls, v: SearchRange | None) -> SearchRange | None:
        if v is not None and (v.low < 0 or (v.log and v.low <= 0)):
            raise ValueError(f"lambda range must be >= 0 (> 0 on a log scale), got low={v.low}")
        return v

    @field_validator("lr")
    @classmethod
    def _lr_range(cls, v: SearchRange | None) -> SearchRange | None:
        if v is not None and v.low <= 0:
            raise ValueError(f"learning-rate range must be > 0, got low={v.low}")
        return v
