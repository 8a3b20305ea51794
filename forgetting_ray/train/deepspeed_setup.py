"""Model, optimizer and engine for one Ray Train worker: DeepSpeed ZeRO 0-3 or plain DDP.

The pure parts (``build_deepspeed_config``, ``lr_factor``, ``resolve_lora_targets``) need no
process group and are unit-tested; ``create_runner`` is called inside the worker loop.

Both engines are wrapped behind :class:`Runner` so the loop reads the same for either:
``forward`` -> per-token NLL, ``backward`` per micro-batch, ``step`` at the accumulation boundary,
``save``/``load`` for resumable checkpoints.  The loss that reaches ``backward`` is already scaled
by the loop; both engines then *average* gradients over ranks and neither divides by the
accumulation count (``scale_wrt_gas=False``), so the loop alone decides the normalisation.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import FinetuneConfig
from ..errors import UserError
from ..models import resolve_dtype
from ..scoring import token_nll

DDP_STATE_FILE = "ddp_state.pt"


class LoraTargetError(UserError, ValueError):
    """LoRA target modules that match no linear layer of the model."""


# ------------------------------------------------------------------------------------------
# pure helpers
# ------------------------------------------------------------------------------------------
def build_deepspeed_config(ft: FinetuneConfig, *, world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config dict of a fine-tune (concrete values only: no Trainer 'auto' fields)."""
    ds = ft.deepspeed
    stage = ds.zero_stage
    if ds.offload_params and stage != 3:
        raise ValueError(f"deepspeed.offload_params needs zero_stage 3, got zero_stage {stage}")
    if ds.offload_optimizer and stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1")
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero["reduce_bucket_size"] = ds.reduce_bucket_size
    if stage == 3:
        # export and 16-bit saves gather the partitioned weights on rank 0
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["stage3_max_live_parameters"] = ds.max_live_parameters
        zero["stage3_max_reuse_distance"] = ds.max_reuse_distance
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": ft.micro_batch_size,
        "gradient_accumulation_steps": ft.grad_accum,
        "train_batch_size": ft.micro_batch_size * ft.grad_accum * world_size,
        "gradient_clipping": float(ft.max_grad_norm or 0.0),
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # a torch.optim.AdamW is passed in: DeepSpeed's own optimizers JIT-compile C++ ops
        # (+55 s on CPU, STACK_NOTES gotcha 1), and with offload it would insist on its CPUAdam
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length as Hugging Face computes it: ceil(ratio * total)."""
    return math.ceil(total_steps * warmup_ratio)


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warmup then linear decay to 0 (transformers' get_linear_schedule_with_warmup)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Full names of every ``nn.Linear`` except the output head (also when tied to the embedding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and mod is not head and name
    ]


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of targets: the full name, or a suffix on a module boundary
    return name == target or name.endswith("." + target)


def resolve_lora_targets(model: torch.nn.Module, targets: list[str] | str) -> list[str]:
    """Target list for peft: 'all-linear' -> the short names of every linear layer but the head.

    Raises :class:`LoraTargetError` when a target matches no linear layer, listing the ones there are.
    """
    linear = linear_module_names(model)
    if not linear:
        raise LoraTargetError(f"{type(model).__name__} has no nn.Linear layers to adapt with LoRA")
    short = sorted({n.rsplit(".", 1)[-1] for n in linear})
    if targets == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head_names = {n for n, m in model.named_modules() if m is head and head is not None}
        # short names are compact, but only safe when none of them also names the head
        if any(_matches(h, s) for h in head_names for s in short):
            return linear
        return short
    missing = [t for t in targets if not any(_matches(n, t) for n in linear)]
    if missing:
        raise LoraTargetError(
            f"lora.target_modules {missing} match no linear layer of {type(model).__name__}; "
            f"available linear module names: {', '.join(short)}"
        )
    return list(targets)


def meta_model(model_path: str, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's module tree on the meta device: checks LoRA targets without loading weights."""
    # transformers, peft and deepspeed stay lazy: importing them costs seconds, and the driver imports
    # this module for its config checks
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


# ------------------------------------------------------------------------------------------
# engines
# ------------------------------------------------------------------------------------------
class TokenNLL(torch.nn.Module):
    """``forward`` = :func:`token_nll`, so DDP's and ZeRO-3's forward hooks run on the outer module.

    The causal LM sits in ``.module`` so ``unwrap_causal_lm`` walks through this wrapper.
    """

    def __init__(self, module: torch.nn.Module, chunk_size: int | None = 1024):
        super().__init__()
        self.module = module
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, labels):
        return token_nll(self.module, input_ids, attention_mask, labels, chunk_size=self.chunk_size)


@dataclass
class Runner:
    """What the loop needs from an engine; subclasses implement DeepSpeed and DDP."""

    model: torch.nn.Module  # the HF or PEFT causal LM (what gets exported)
    device: torch.device
    autocast_dtype: torch.dtype | None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self._forward(
                batch["input_ids"].to(self.device),
                batch["attention_mask"].to(self.device),
                batch["labels"].to(self.device),
            )

    # implemented by subclasses
    def _forward(self, input_ids, attention_mask, labels) -> torch.Tensor: ...
    def backward(self, loss: torch.Tensor, boundary: bool) -> None: ...
    def step(self, boundary: bool) -> float | None: ...
    def lr(self) -> float: ...
    def save(self, folder: Path, tag: str) -> None: ...
    def load(self, folder: Path, tag: str) -> None: ...
    def export_handle(self) -> Any: ...


class DeepSpeedRunner(Runner):
    def __init__(self, engine, model, device, zero_stage: int):
        super().__init__(model=model, device=device, autocast_dtype=None)  # DeepSpeed casts itself
        self.engine = engine
        self.zero_stage = zero_stage

    def _forward(self, input_ids, attention_mask, labels):
        return self.engine(input_ids, attention_mask, labels)

    def backward(self, loss, boundary):
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, boundary):
        pre_norm = None
        if boundary and self.zero_stage == 0:
            # without ZeRO the torch optimizer reports no norm; grads are all-reduced by now
            pre_norm = _grad_norm(p for p in self.model.parameters() if p.requires_grad)
        self.engine.step()
        if not boundary:
            return None
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = pre_norm
        return float(norm) if norm is not None else float("nan")

    def lr(self):
        return float(self.engine.get_lr()[0])

    def save(self, folder, tag):
        self.engine.save_checkpoint(str(folder), tag=tag)

    def load(self, folder, tag):
        path, _ = self.engine.load_checkpoint(str(folder), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {tag!r} in {folder}")

    def export_handle(self):
        return self.engine


class DDPRunner(Runner):
    def __init__(self, wrapped, model, optimizer, scheduler, device, autocast_dtype, max_grad_norm):
        super().__init__(model=model, device=device, autocast_dtype=autocast_dtype)
        self.wrapped = wrapped  # DDP(TokenNLL(model)), or TokenNLL(model) on one worker
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self._sync = True

    def _forward(self, input_ids, attention_mask, labels):
        return self.wrapped(input_ids, attention_mask, labels)

    def set_boundary(self, boundary: bool) -> None:
        """Before the forward: gradients are all-reduced only on the last micro-batch of a step."""
        if isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel):
            self.wrapped.require_backward_grad_sync = boundary

    def backward(self, loss, boundary):
        loss.backward()

    def step(self, boundary):
        if not boundary:
            return None
        params = [p for p in self.model.parameters() if p.requires_grad]
        limit = self.max_grad_norm if self.max_grad_norm else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self):
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, folder, tag):
        if dist.is_initialized() and dist.get_rank() != 0:
            return  # replicas are identical: rank 0's copy is the checkpoint
        trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        state = {"model": trainable, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        out = Path(folder) / tag
        out.mkdir(parents=True, exist_ok=True)
        torch.save(state, out / DDP_STATE_FILE)

    def load(self, folder, tag):
        path = Path(folder) / tag / DDP_STATE_FILE
        if not path.is_file():
            raise RuntimeError(f"no DDP checkpoint state at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        params = dict(self.model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state["model"]]
        unexpected = [n for n in state["model"] if n not in params]
        if missing or unexpected:
            raise RuntimeError(
                f"{path}: parameters differ from the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        with torch.no_grad():
            for n, t in state["model"].items():
                params[n].copy_(t)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def export_handle(self):
        return self.model


def _grad_norm(params) -> float:
    sq = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


# Kept alive for the worker's lifetime: transformers consults it (weakly) while loading under ZeRO-3.
_HF_DS_CONFIG = None


def load_causal_lm(model_path: str, *, ds_config: dict | None, trust_remote_code: bool = False,
                   attn_implementation: str | None = None) -> torch.nn.Module:
    """fp32 master weights, in training mode (dropout on, activation checkpointing able to engage); under
    ZeRO-3 each rank only ever holds its partition (zero.Init)."""
    global _HF_DS_CONFIG
    from transformers import AutoModelForCausalLM

    if ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)  # must exist before from_pretrained
    else:
        _HF_DS_CONFIG = None
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code, **attn
    )
    return model.train()  # from_pretrained returns eval mode, where transformers skips gradient checkpointing


def training_precision(dtype: str, device: torch.device) -> torch.dtype | None:
    """The compute dtype of mixed precision over fp32 master weights (None: plain fp32), from model.dtype:
    'auto' is bf16 on a GPU, fp32 on the CPU; fp16 would need loss scaling, which this loop does not do."""
    resolved = resolve_dtype(dtype, device)
    if resolved == torch.float16:
        raise UserError("model.dtype float16 cannot train here (no loss scaling): use bfloat16 or float32")
    return torch.bfloat16 if resolved == torch.bfloat16 else None


def apply_lora(model: torch.nn.Module, ft: FinetuneConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = resolve_lora_targets(model, ft.lora.target_modules)
    cfg = LoraConfig(
        r=ft.lora.r,
        lora_alpha=ft.lora.alpha,
        lora_dropout=ft.lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def _enable_gradient_checkpointing(model: torch.nn.Module, *, lora: bool) -> None:
    """Recompute activations in backward (non-reentrant); engages only in training mode."""
    # transformers 5 renamed it (the old name warns)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model.enable_input_require_grads()


def create_runner(
    model_path: str,
    ft: FinetuneConfig,
    *,
    world_size: int,
    total_steps: int,
    device: torch.device,
    chunk_size: int | None = 1024,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    dtype: str = "auto",
) -> Runner:
    """Build model (+LoRA), AdamW, the warmup/decay schedule and the engine, inside a worker."""
    use_gpu = device.type == "cuda"
    compute = training_precision(dtype, device)
    if use_gpu:
        torch.cuda.set_device(device)  # DeepSpeed and NCCL use the current device
    torch.manual_seed(ft.seed)  # identical LoRA init on every rank
    ds_config = None
    if ft.deepspeed.enabled:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")  # reuses Ray's group
        ds_config = build_deepspeed_config(ft, world_size=world_size, bf16=compute == torch.bfloat16)
    model = load_causal_lm(model_path, ds_config=ds_config, trust_remote_code=trust_remote_code,
                           attn_implementation=attn_implementation)
    if ft.gradient_checkpointing:
        _enable_gradient_checkpointing(model, lora=ft.lora.enabled)
    if ft.lora.enabled:
        model = apply_lora(model, ft)
    wrapper = TokenNLL(model, chunk_size=chunk_size)
    params = [p for p in wrapper.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=ft.lr, weight_decay=ft.weight_decay)
    warm = warmup_steps(total_steps, ft.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_factor(k, warmup=warm, total=total_steps)
    )
    if ds_config is not None:
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(
            model=wrapper, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        return DeepSpeedRunner(engine, model, device, ft.deepspeed.zero_stage)
    wrapper.to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapper, device_ids=[device.index] if use_gpu else None
        )
    else:
        wrapped = wrapper
    # fp32 masters + bf16 autocast, as the paper
    return DDPRunner(wrapped, model, optimizer, scheduler, device, compute, ft.max_grad_norm)
