"""Fine-tuning, shared by the reference SFT and the forgetting training."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import LambdaSchedule, Section


class LoraSettings(Section):
    enabled: bool = Field(True, description="Train a LoRA adapter (True) or all weights (False).")
    r: int = Field(64, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.1, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Modules to adapt; 'all-linear' = every linear projection except the output head "
        "(q,k,v,o,gate,up,down on Llama).",
    )


class DeepSpeedSettings(Section):
    enabled: bool = Field(True, description="Use DeepSpeed; False = plain DDP.")
    zero_stage: Literal[0, 1, 2, 3] = Field(3, description="ZeRO stage.")
    offload_optimizer: bool = Field(False, description="Offload optimizer states to CPU.")
    offload_params: bool = Field(False, description="Offload parameters to CPU (ZeRO-3 only).")
    max_live_parameters: int = Field(
        1_000_000_000, gt=0,
        description="ZeRO-3: most parameters held gathered (whole) at once, prefetch included "
        "(DeepSpeed's stage3_max_live_parameters). Lower it to cap memory at the cost of more gathers.",
    )
    max_reuse_distance: int = Field(
        1_000_000_000, ge=0,
        description="ZeRO-3: a gathered parameter is kept when it is used again within this many parameters "
        "(DeepSpeed's stage3_max_reuse_distance); 0 frees each layer after use.",
    )
    reduce_bucket_size: int = Field(
        500_000_000, gt=0,
        description="ZeRO 1-3: gradient elements gathered into one bucket before they are reduced "
        "(DeepSpeed's reduce_bucket_size). A full fine-tune holds up to one bucket of whole gradients per "
        "worker; lower it when host or GPU memory is short.",
    )


class FinetuneConfig(Section):
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Linear warmup as a fraction of optimizer steps.")
    epochs: int = Field(1, gt=0, description="Passes over the data.")
    max_steps: int | None = Field(
        None, gt=0, description="Stop after this many optimizer steps (overrides epochs)."
    )
    micro_batch_size: int = Field(2, gt=0, description="Sequences per worker per micro-batch.")
    grad_accum: int = Field(3, gt=0, description="Micro-batches per optimizer step.")
    max_grad_norm: float | None = Field(
        None, gt=0, description="Clip the gradient norm; None = no clipping (as the paper)."
    )
    shuffle: bool = Field(False, description="Seeded shuffle of the data; False = file order (paper).")
    seed: int = Field(42, description="Seed for initialisation, dropout and shuffling.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter settings.")
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings, description="DeepSpeed settings.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    checkpoint_every: int | None = Field(
        None, gt=0, description="Save a resumable checkpoint every N optimizer steps."
    )
    export_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="dtype of the exported Hugging Face safetensors."
    )
    export_max_shard_size: str = Field(
        "5GB", pattern=r"^[0-9]+(\.[0-9]+)?\s*[KMG]i?B$",
        description="Largest safetensors file of the merged export (e.g. '2GB'): bigger models are written "
        "in shards with an index, as on the Hugging Face Hub.",
    )
    report_every: int = Field(
        1,
        gt=0,
        description="Report metrics to Ray Train every N optimizer steps (checkpoints and the last step are "
        "always reported). Ray Train V2 takes one report per worker every 2 s, so a report per step "
        "throttles steps faster than that; every step's metrics are kept in metrics.jsonl regardless.",
    )
    export: bool = Field(
        True, description="Export the trained model at the end (merged HF folder, LoRA adapter, manifest)."
    )
    keep_checkpoints: int = Field(
        2, gt=0, description="Resumable checkpoints kept in Ray Train storage (the newest ones)."
    )
    max_failures: int = Field(
        1, ge=0, description="Worker-group failures Ray Train recovers from (restart from the latest checkpoint)."
    )
    resume_from: str | None = Field(
        None,
        description="Checkpoint folder to start from when Ray Train storage holds none for this run "
        "(must come from the same configuration, data and base model).",
    )


class ReferenceConfig(FinetuneConfig):
    """Reference SFT (stage 1): plain SFT on the held-out reference subset."""


class TrainingConfig(FinetuneConfig):
    strategy: Literal["forgetting", "ignore", "sft"] = Field(
        "forgetting",
        description="'forgetting' = mean NLL(pos) - lambda*mean NLL(neg); 'ignore' = positives only "
        "(token dropping); 'sft' = all response tokens (standard SFT baseline).",
    )
    lambda_schedule: LambdaSchedule = Field(
        "linear",
        description="lambda over the global optimizer step k: linear=(t_max-t_min)k/T (paper code), "
        "linear_offset=t_min+(t_max-t_min)k/T, constant=t_max, cosine=0->t_max.",
    )
    t_max: float = Field(0.25, ge=0, description="Largest forgetting weight lambda.")
    t_min: float = Field(1e-5, ge=0, description="Smallest forgetting weight (see lambda_schedule).")
    normalization: Literal["micro_batch", "global"] = Field(
        "micro_batch",
        description="Average each class over its count in the micro-batch (paper) or over the whole "
        "optimizer step across micro-batches and ranks.",
    )
    forget_loss: Literal["nll", "unlikelihood"] = Field(
        "nll",
        description="The forgetting term over the negatives: 'nll' = -lambda*mean NLL (paper; unbounded), "
        "'unlikelihood' = +lambda*mean -log(1-p) (pushes p down, flattens out as p -> 0).",
    )
    guardrail_neg_nll_max: float | None = Field(
        None, gt=0, description="If the negative-token NLL exceeds this, apply guardrail_action."
    )
    guardrail_pos_nll_factor: float | None = Field(
        None,
        gt=1,
        description="If the positive-token NLL exceeds this factor times its first-step value, apply guardrail_action.",
    )
    guardrail_action: Literal["backoff", "stop"] = Field(
        "backoff", description="On a guardrail breach: halve lambda ('backoff') or stop with a reason."
    )

    @model_validator(mode="after")
    def _check_lambda_range(self) -> "TrainingConfig":
        if self.t_min > self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must not exceed t_max ({self.t_max})")
        return self
