"""How much GPU and CPU memory a fine-tune needs, before renting the GPUs.

``plan(model, num_nodes, gpus_per_node, lora=..., zero_stage=..., offload=...)`` counts the model's
parameters from its architecture alone (the module tree is built on the ``meta`` device: no weights
are allocated or downloaded), feeds the counts to DeepSpeed's ZeRO estimators and adds an activation
estimate for one micro-batch.  The preset models' architectures are carried in :data:`ARCHITECTURES`
so planning works offline; any local Hugging Face folder works too (only config.json is read).

Model states (per GPU, bf16 mixed precision with fp32 master weights and AdamW, DeepSpeed's own
accounting of 2 + 16 bytes per trained parameter):
  * ZeRO-3: ``estimate_zero3_model_states_mem_needs`` (partitioned over all GPUs, +4 bytes x the
    largest layer for the gather buffer; offload moves optimizer states / parameters to CPU);
  * ZeRO-1/2: ``estimate_zero2_model_states_mem_needs`` (the stage-1 figure adds the 16-bit
    gradients that stage 1 does not partition);
  * ZeRO-0 (no DeepSpeed partitioning): the ZeRO-2 estimate for a single GPU.
  * LoRA: the estimator runs on the adapter's parameter count; the frozen base adds 2 bytes per
    parameter (bf16), divided over the GPUs at ZeRO-3 or moved to CPU with parameter offload.

Activations (per GPU, bf16) for one micro-batch of ``micro_batch_size x seq_len`` tokens, counting the
tensors autograd keeps per decoder layer: norm inputs and outputs, q/k/v, attention output, the MLP
intermediates, LoRA dropout outputs and masks, the attention score matrix when the attention is eager
(no SDPA/flash kernel), and the fp32 log-softmax the loss keeps for every scored position.  With
gradient checkpointing only each layer's input is kept, plus one layer's activations during recompute.
A fixed allowance covers the CUDA context, NCCL buffers and allocator slack.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .aliases import ALIASES as MODEL_ALIASES
from .cluster.devices import cluster_gpus, smallest_gpu_gib
from .cluster.session import init_ray
from .config import DeepSpeedSettings, PipelineConfig, ScoringConfig, load_config
from .constants import logit_chunk_rows
from .errors import UserError

GIB = 2**30
RUNTIME_ALLOWANCE_BYTES = 2 * GIB  # CUDA context + NCCL buffers + allocator fragmentation
EAGER_SCORE_BYTES = 10  # per attention score: fp32 scores and softmax output, 16-bit copy for the value matmul

# Architecture configs of the preset models (from each model's config.json on the hub), so that
# planning and bench/gpu_check.py run offline.  Keys are hub ids; SHORT_NAMES maps short names to them.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.2-1B": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
    ),
    "meta-llama/Llama-3.2-3B": dict(
        model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
    ),
    "meta-llama/Llama-3.1-8B": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
    ),
    "meta-llama/Llama-2-13b-hf": dict(
        model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
        max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
    ),
    "Qwen/Qwen2.5-0.5B": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
    ),
    "Qwen/Qwen2.5-3B": dict(
        model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
    ),
    "EleutherAI/gpt-neo-2.7B": dict(
        model_type="gpt_neo", hidden_size=2560, num_layers=32, num_heads=20, vocab_size=50257,
        max_position_embeddings=2048, attention_types=[[["global", "local"], 16]], window_size=256,
        tie_word_embeddings=True,
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
        max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
    ),
}
# Short names `plan` accepts: the presets in jobs/configs, plus the loadable aliases (forgetting_ray.aliases).
SHORT_NAMES = {
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B",
    "gpt-neo-2.7b": "EleutherAI/gpt-neo-2.7B",
    **{name: alias.hub_id for name, alias in MODEL_ALIASES.items() if alias.hub_id},
}
# Attention kernels that never materialise the [s, s] score matrix; others are treated as eager.
FUSED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


class PlanError(UserError, ValueError):
    pass


# ------------------------------------------------------------------------------------------
# architecture -> parameter counts
# ------------------------------------------------------------------------------------------
def lookup_architecture(name: str) -> tuple[str, dict[str, Any]] | None:
    """(hub id, config kwargs) of a built-in model by hub id, alias or last path part; None if unknown."""
    key = name.strip()
    if key in ARCHITECTURES:
        return key, ARCHITECTURES[key]
    low = key.lower()
    if low in SHORT_NAMES:
        return SHORT_NAMES[low], ARCHITECTURES[SHORT_NAMES[low]]
    for hub_id, cfg in ARCHITECTURES.items():
        if hub_id.lower() == low or hub_id.split("/")[-1].lower() == low.rstrip("/").split("/")[-1]:
            return hub_id, cfg
    return None


def hf_config(model: Any):
    """A transformers config from a built-in name, a local HF folder, a dict, a config object or a
    :class:`~forgetting_ray.config.PipelineConfig` (its ``model.name_or_path``)."""
    from transformers import AutoConfig, PretrainedConfig


    if isinstance(model, PipelineConfig):
        model = model.model.name_or_path
    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, dict):
        kwargs = dict(model)
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    name = str(model)
    found = lookup_architecture(name)
    if found is not None:
        kwargs = dict(found[1])
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    known = ", ".join(sorted(SHORT_NAMES)) + "; " + ", ".join(ARCHITECTURES)
    raise PlanError(
        f"unknown model {name!r}: not a built-in architecture ({known}) and not a local folder with config.json"
    )


@dataclass(frozen=True)
class ModelShape:
    """What the estimators need, counted on a meta-device instance of the architecture."""

    name: str
    model_type: str
    params: int  # unique parameters (tied embeddings counted once)
    largest_layer_params: int  # biggest single module's own parameters (ZeRO-3 gather buffer)
    embedding_params: int  # input embedding matrix (no matmul FLOPs unless tied to the head)
    tied_embeddings: bool
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    kv_size: int  # num_key_value_heads * head_dim
    vocab_size: int
    gated_mlp: bool
    attention: str  # the attention kernel the model uses by default on GPU
    lora_targets: tuple[str, ...] = ()
    lora_in_features: int = 0  # sum of in_features of every LoRA-targeted linear
    lora_out_features: int = 0
    lora_modules: int = 0

    def lora_params(self, r: int) -> int:
        return r * (self.lora_in_features + self.lora_out_features)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def model_shape(model: Any, *, lora_targets: list[str] | str = "all-linear") -> ModelShape:
    """Count parameters of ``model`` (see :func:`hf_config`) without allocating any weights."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = hf_config(model)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    params = {id(p): p.numel() for p in m.parameters()}
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in m.modules())
    emb = m.get_input_embeddings().weight
    head = m.get_output_embeddings()
    tied = head is not None and head.weight is emb
    linear = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and mod is not head]
    if lora_targets == "all-linear":
        chosen = linear
    else:
        chosen = [(n, mod) for n, mod in linear if any(_matches(n, t) for t in lora_targets)]
        missing = [t for t in lora_targets if not any(_matches(n, t) for n, _ in linear)]
        if missing:
            short = sorted({n.rsplit(".", 1)[-1] for n, _ in linear})
            raise PlanError(f"LoRA targets {missing} match no linear layer of {cfg.model_type}; linear layers: {short}")
    text = cfg.get_text_config()
    heads = getattr(text, "num_attention_heads", None) or text.num_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    gated = any(_matches(n, "gate_proj") for n, _ in linear)
    attention = "sdpa" if getattr(m, "_supports_sdpa", False) else "eager"
    return ModelShape(
        name=str(getattr(cfg, "_name_or_path", "") or model),
        model_type=cfg.model_type,
        params=sum(params.values()),
        largest_layer_params=largest,
        embedding_params=emb.numel(),
        tied_embeddings=tied,
        hidden_size=text.hidden_size,
        intermediate_size=intermediate,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        kv_size=kv_heads * head_dim,
        vocab_size=text.vocab_size,
        gated_mlp=gated,
        attention=attention,
        lora_targets=tuple(sorted({n.rsplit(".", 1)[-1] for n, _ in chosen})),
        lora_in_features=sum(mod.in_features for _, mod in chosen),
        lora_out_features=sum(mod.out_features for _, mod in chosen),
        lora_modules=len(chosen),
    )


# ------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------
def activation_bytes(
    shape: ModelShape,
    *,
    micro_batch_size: int,
    seq_len: int,
    lora: bool,
    lora_r: int,
    gradient_checkpointing: bool,
    attention: str | None = None,
    value_bytes: int = 2,
) -> int:
    """Bytes autograd keeps for one micro-batch (``value_bytes``: 2 for bf16 activations on a GPU, 4 for fp32
    on the CPU), see the module docstring."""
    tokens = micro_batch_size * seq_len
    h, i, kv, b = shape.hidden_size, shape.intermediate_size, shape.kv_size, value_bytes
    mlp = 4 * i if shape.gated_mlp else 2 * i  # gate, up, act(gate), act*up  |  fc, act(fc)
    per_layer = b * tokens * (6 * h + 2 * kv + mlp)
    if lora:  # per targeted linear: dropout output + dropout mask (1 byte) + A output
        per_layer += ((b + 1) * tokens * shape.lora_in_features + b * tokens * lora_r * shape.lora_modules) \
            // shape.num_layers
    if (attention or shape.attention) not in FUSED_ATTENTION:
        per_layer += (EAGER_SCORE_BYTES + 2 * (b - 2)) * micro_batch_size * shape.num_heads * seq_len * seq_len
    if gradient_checkpointing:
        body = shape.num_layers * b * tokens * h + per_layer
    else:
        body = shape.num_layers * per_layer
    head = tokens * (b * h + 4 * shape.vocab_size)  # picked hidden states + fp32 log-softmax per scored position
    return body + head + b * tokens * h  # + embedding output


def model_states_bytes(
    shape: ModelShape,
    *,
    num_nodes: int,
    gpus_per_node: int,
    zero_stage: int,
    lora: bool,
    lora_r: int,
    offload_optimizer: bool,
    offload_params: bool,
) -> tuple[int, int]:
    """(GPU bytes per GPU, CPU bytes per node) for parameters, gradients and optimizer states."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    world = num_nodes * gpus_per_node
    trained = shape.lora_params(lora_r) if lora else shape.params
    frozen = shape.params if lora else 0
    if zero_stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            trained, shape.largest_layer_params, num_gpus_per_node=gpus_per_node, num_nodes=num_nodes,
            cpu_offload=offload_optimizer or offload_params, cpu_offload_params=offload_params, zero_init=True,
        )
        if offload_params:
            cpu += int(2 * frozen / num_nodes * 1.5)  # same 1.5 buffer factor as DeepSpeed's CPU figures
        else:
            gpu += 2 * frozen // world
    else:
        nodes, gpn = (num_nodes, gpus_per_node) if zero_stage in (1, 2) else (1, 1)
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            trained, num_gpus_per_node=gpn, num_nodes=nodes, cpu_offload=offload_optimizer
        )
        if zero_stage == 1 and world > 1:
            gpu += int(2 * trained * (1 - 1 / world))  # stage 1 keeps whole 16-bit gradients
        gpu += 2 * frozen  # every GPU holds the whole frozen base below ZeRO-3
    return int(gpu), int(cpu)


# ------------------------------------------------------------------------------------------
# host memory: training and scoring on the CPU (fp32), what bench/bench_scale.py measures
# ------------------------------------------------------------------------------------------
# A Ray worker process with torch, transformers, peft and DeepSpeed imported and the gloo group up, before any
# weights: the peak private memory (cluster.devices.PeakMemory) of the tiny-shape workers of bench/gpu_check.py
# --cpu-rehearsal, where weights are negligible (tests/integration/test_gpu_check.py holds the plan to it).
HOST_RUNTIME_BYTES = int(0.5 * GIB)
# A scoring actor before its models load: no DeepSpeed or process group, but its resident figure counts the
# shared libraries' mapped pages too (it counts the mapped weights); measured the same way.
SCORING_RUNTIME_BYTES = int(0.6 * GIB)


@dataclass(frozen=True)
class HostMemory:
    """Peak host bytes of one process, by part (the parts are summed: they are alive at the same time)."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


DEEPSPEED_SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's default sub_group_size; the product leaves it


def host_training_memory(
    shape: ModelShape,
    *,
    workers: int,
    lora: bool,
    lora_r: int,
    zero_stage: int,
    micro_batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    deepspeed: bool = True,
    reduce_bucket_size: int = DeepSpeedSettings().reduce_bucket_size,
) -> HostMemory:
    """Peak private memory of one Ray Train worker fine-tuning on the CPU: fp32 weights and compute
    (``model.dtype: auto`` on a CPU), torch AdamW, ``workers`` ranks.

    * parameters: every weight at 4 bytes, partitioned over the ranks at ZeRO-3;
    * trained states: per trained weight AdamW's two moments (8 bytes), the gradient (4) and, under DeepSpeed,
      its fp32 master copy (4), partitioned from ZeRO-1 (gradients from ZeRO-2); DDP adds its 4-byte buckets;
    * activations: :func:`activation_bytes` at 4 bytes per value;
    * runtime: :data:`HOST_RUNTIME_BYTES`.

    ZeRO-3 with LoRA adds *gathered*: every weight once more, whole. Each layer is gathered for its forward and
    again for the backward; on the CPU the freed buffers mostly stay in the process (the C allocator keeps blocks
    under its mmap threshold for reuse), so at the peak nearly the whole model is resident in both forms
    (bench/bench_scale.py at Llama-3.2-1B's shape: within 3 %).

    A full fine-tune at ZeRO-3 adds, instead, DeepSpeed's own buffers (found part by part at Qwen2.5-0.5B's width
    with 2-6 layers; bench/bench_host_memory.py holds the sum within 2.5 % of the measured steady state and peak,
    one rank and two, bench/results/host_memory.md):
    * reduce bucket: ``torch.empty(reduce_bucket_size)`` whole on every rank, resident as far as it is written:
      4 bytes x min(trained, reduce_bucket_size);
    * transient, the larger of the backward's last bucket flush (twice the bucket: the reduce-scatter's
      ``torch.cat`` copy and gloo's own, plus the gathered input embedding still alive on more than one rank)
      and the optimizer step (12 bytes per weight of a sub group: the flattened gradient copy and AdamW's
      temporaries).
    Not counted: what the C allocator keeps of freed blocks, measured there with glibc's defaults at 0.10-0.20 GiB
    per layer at 896 wide (varying run to run; none with ``MALLOC_MMAP_THRESHOLD_=65536``).
    """
    b = 4
    n, trained = shape.params, shape.lora_params(lora_r) if lora else shape.params
    stage = zero_stage if deepspeed else 0
    params_shard = workers if stage == 3 else 1
    states_shard = workers if stage >= 1 else 1
    grads_shard = workers if stage >= 2 else 1
    master = 4 if deepspeed else 0
    trained_states = (8 + master) * trained // states_shard + 4 * trained // grads_shard
    if not deepspeed and workers > 1:
        trained_states += 4 * trained  # DDP's gradient buckets
    parts = {"runtime": HOST_RUNTIME_BYTES, "parameters": b * n // params_shard, "trained_states": trained_states}
    if stage == 3 and lora:
        parts["gathered"] = b * n
    elif stage == 3:
        bucket = min(trained, reduce_bucket_size)
        parts["reduce_bucket"] = b * bucket
        flush = 2 * b * bucket + (b * shape.vocab_size * shape.hidden_size if workers > 1 else 0)
        optimizer_step = 3 * b * min(trained // workers, DEEPSPEED_SUB_GROUP_SIZE)
        parts["transient"] = max(flush, optimizer_step)
    parts["activations"] = activation_bytes(shape, micro_batch_size=micro_batch_size, seq_len=seq_len, lora=lora,
                                            lora_r=lora_r, gradient_checkpointing=gradient_checkpointing,
                                            attention="sdpa", value_bytes=b)
    return HostMemory(parts)


def scoring_actor_memory(
    shape: ModelShape,
    *,
    adapter_reference: bool,
    lora_r: int,
    batch_tokens: int,
    max_length: int,
    chunk_size: int | None,
) -> HostMemory:
    """Peak resident memory of one scoring actor on the CPU (fp32, inference): the base model, the reference
    (its LoRA adapter over the same base weights, or a second full model), one batch's largest activations
    (no autograd: a layer's tensors live only while it computes) and the head's logits chunk. The weights are
    pages mapped from the safetensors files and count as resident (``cluster.devices.PeakMemory``)."""
    b = 4
    weights = b * shape.params * (1 if adapter_reference else 2)
    if adapter_reference:
        weights += b * shape.lora_params(lora_r)
    tokens = max(batch_tokens, max_length)  # a batch holds at least one whole sequence
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_size
    layer = b * tokens * (4 * h + 2 * kv + (3 * i if shape.gated_mlp else 2 * i))
    chunk = min(chunk_size or logit_chunk_rows(shape.vocab_size), tokens)  # no more rows than the batch has
    head = 2 * b * chunk * shape.vocab_size  # fp32 logits and cross_entropy's log-softmax
    return HostMemory({"runtime": SCORING_RUNTIME_BYTES, "weights": weights, "activations": layer + b * tokens * h,
                       "head": head})


@dataclass(frozen=True)
class PlanResult:
    model: str
    num_nodes: int
    gpus_per_node: int
    zero_stage: int
    lora: bool
    lora_r: int
    offload_optimizer: bool
    offload_params: bool
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    attention: str
    params: int
    trainable_params: int
    largest_layer_params: int
    gpu_model_states_bytes: int
    gpu_activation_bytes: int
    gpu_runtime_bytes: int
    cpu_per_node_bytes: int
    shape: ModelShape = field(repr=False, compare=False)

    @property
    def gpu_total_bytes(self) -> int:
        return self.gpu_model_states_bytes + self.gpu_activation_bytes + self.gpu_runtime_bytes

    @property
    def node_gpu_bytes(self) -> int:
        return self.gpu_total_bytes * self.gpus_per_node

    @property
    def offload(self) -> str:
        return "all" if self.offload_params else "optimizer" if self.offload_optimizer else "none"

    def fits(self, gpu_memory_gib: float) -> bool:
        return self.gpu_total_bytes <= gpu_memory_gib * GIB

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("shape")
        d.update(gpu_total_bytes=self.gpu_total_bytes, node_gpu_bytes=self.node_gpu_bytes)
        return d

    def table(self, gpu_memory_gib: float | None = None) -> str:
        return plan_table([self], gpu_memory_gib=gpu_memory_gib)


def _offload_flags(offload: bool | str, zero_stage: int) -> tuple[bool, bool]:
    if offload in (False, None, "none"):
        return False, False
    if offload in (True, "all"):
        return True, zero_stage == 3
    if offload == "optimizer":
        return True, False
    if offload == "params":
        return False, True
    raise PlanError(f"offload must be a bool or one of none, optimizer, params, all; got {offload!r}")


def plan(
    model_name_or_config: Any,
    num_nodes: int,
    gpus_per_node: int,
    *,
    lora: bool,
    zero_stage: int,
    offload: bool | Literal["none", "optimizer", "params", "all"],
    micro_batch_size: int = 2,
    seq_len: int = 2048,
    lora_r: int = 64,
    lora_targets: list[str] | str = "all-linear",
    gradient_checkpointing: bool = True,
    attention: str | None = None,
    shape: ModelShape | None = None,
) -> PlanResult:
    """Per-GPU and per-node memory of a fine-tune (see the module docstring for the accounting).

    ``offload``: True = optimizer states (and at ZeRO-3 parameters) on CPU; or 'none', 'optimizer',
    'params' (ZeRO-3 only), 'all'.  ``attention``: the kernel, default the model's (sdpa / eager).
    ``shape``: a precomputed :func:`model_shape` to skip rebuilding the meta model.
    """
    if num_nodes < 1 or gpus_per_node < 1:
        raise PlanError(f"need at least one node and one GPU per node, got {num_nodes} x {gpus_per_node}")
    if zero_stage not in (0, 1, 2, 3):
        raise PlanError(f"zero_stage must be 0-3, got {zero_stage}")
    offload_optimizer, offload_params = _offload_flags(offload, zero_stage)
    if offload_params and zero_stage != 3:
        raise PlanError("parameter offload needs ZeRO-3")
    if offload_optimizer and zero_stage == 0:
        raise PlanError("optimizer offload needs ZeRO-1 or higher")
    shape = shape or model_shape(model_name_or_config, lora_targets=lora_targets)
    gpu_states, cpu = model_states_bytes(
        shape, num_nodes=num_nodes, gpus_per_node=gpus_per_node, zero_stage=zero_stage, lora=lora,
        lora_r=lora_r, offload_optimizer=offload_optimizer, offload_params=offload_params,
    )
    acts = activation_bytes(
        shape, micro_batch_size=micro_batch_size, seq_len=seq_len, lora=lora, lora_r=lora_r,
        gradient_checkpointing=gradient_checkpointing, attention=attention,
    )
    return PlanResult(
        model=shape.name, num_nodes=num_nodes, gpus_per_node=gpus_per_node, zero_stage=zero_stage, lora=lora,
        lora_r=lora_r, offload_optimizer=offload_optimizer, offload_params=offload_params,
        micro_batch_size=micro_batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
        attention=attention or shape.attention, params=shape.params,
        trainable_params=shape.lora_params(lora_r) if lora else shape.params,
        largest_layer_params=shape.largest_layer_params, gpu_model_states_bytes=gpu_states,
        gpu_activation_bytes=acts, gpu_runtime_bytes=RUNTIME_ALLOWANCE_BYTES, cpu_per_node_bytes=cpu, shape=shape,
    )


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def plan_table(results: list[PlanResult], *, gpu_memory_gib: float | None = None, mark: PlanResult | None = None) -> str:
    """A fixed-width table, one row per plan (GiB)."""
    if not results:
        return ""
    r0 = results[0]
    lines = [
        f"{r0.model}: {r0.params / 1e9:.2f}B params, largest layer {r0.largest_layer_params / 1e6:.0f}M; "
        f"micro-batch {r0.micro_batch_size} x {r0.seq_len} tokens, attention {r0.attention}",
        "memory in GiB; 'GPU total' per GPU = model states + activations + "
        f"{_gib(RUNTIME_ALLOWANCE_BYTES)} runtime allowance",
    ]
    head = ["", "mode", "ZeRO", "offload", "ckpt", "GPUs", "trainable", "states/GPU", "activ/GPU", "GPU total",
            "GPU/node", "CPU/node"]
    if gpu_memory_gib:
        head.append(f"fits {gpu_memory_gib:g}G")
    rows = [head]
    for r in results:
        row = [
            "*" if mark is not None and r == mark else "",
            f"LoRA r{r.lora_r}" if r.lora else "full",
            str(r.zero_stage),
            r.offload,
            "on" if r.gradient_checkpointing else "off",
            f"{r.num_nodes}x{r.gpus_per_node}",
            f"{r.trainable_params / 1e6:,.1f}M",
            _gib(r.gpu_model_states_bytes),
            _gib(r.gpu_activation_bytes),
            _gib(r.gpu_total_bytes),
            _gib(r.node_gpu_bytes),
            _gib(r.cpu_per_node_bytes),
        ]
        if gpu_memory_gib:
            row.append("yes" if r.fits(gpu_memory_gib) else "NO")
        rows.append(row)
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    for row in rows:
        lines.append("  ".join(cell.rjust(w) if c > 1 else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def add_plan_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", help="preset YAML (jobs/configs/*.yaml), built-in name (llama-3.1-8b, "
                   "meta-llama/Llama-3.1-8B, ...) or a local Hugging Face folder")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node (default: resources.num_workers of a YAML, else 8)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None, help="default: the YAML's, else 3")
    p.add_argument("--offload", choices=("none", "optimizer", "params", "all"), default=None,
                   help="default: the YAML's, else none")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="lora", action="store_true", default=None, help="plan a LoRA fine-tune")
    mode.add_argument("--full", dest="lora", action="store_false", help="plan a full fine-tune")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: the YAML's, else 64)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per GPU per micro-batch (default 2)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: data.max_length, else 2048)")
    ckpt = p.add_mutually_exclusive_group()
    ckpt.add_argument("--gradient-checkpointing", dest="ckpt", action="store_true", default=None)
    ckpt.add_argument("--no-gradient-checkpointing", dest="ckpt", action="store_false")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="GPU memory for the 'fits' column (default: read from the GPUs of the Ray cluster at "
                        "--address / $RAY_ADDRESS; without either, no 'fits' column)")
    p.add_argument("--address", default=None, help="Ray cluster whose GPUs' memory fills the 'fits' column")
    p.add_argument("--section", choices=("training", "reference"), default="training",
                   help="which fine-tune section of a YAML to plan (default training)")
    p.add_argument("--json", action="store_true", help="print the chosen plan as JSON instead of the table")
    p.add_argument("--cpu", action="store_true",
                   help="plan training and scoring on CPUs instead: host memory per Ray worker (fp32) by part, "
                        "for --gpus-per-node workers, and per scoring actor")
    return p


def _settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    scoring = ScoringConfig()
    s: dict[str, Any] = dict(model=args.model, gpus_per_node=8, zero_stage=3, offload="none", lora=True, lora_r=64,
                             lora_targets="all-linear", micro_batch_size=2, seq_len=2048, gradient_checkpointing=True,
                             attention=None, deepspeed=True, reference_lora=True, reference_lora_r=64,
                             batch_tokens=scoring.batch_tokens, chunk_size=scoring.chunk_size,
                             reduce_bucket_size=DeepSpeedSettings().reduce_bucket_size)
    if args.model.endswith((".yaml", ".yml")):
        cfg = load_config(args.model)
        ft = getattr(cfg, args.section)
        ds = ft.deepspeed
        s.update(
            model=cfg.model.name_or_path, gpus_per_node=cfg.resources.num_workers,
            zero_stage=ds.zero_stage if ds.enabled else 0,
            offload="all" if ds.offload_params else "optimizer" if ds.offload_optimizer else "none",
            lora=ft.lora.enabled, lora_r=ft.lora.r, lora_targets=ft.lora.target_modules,
            micro_batch_size=ft.micro_batch_size, seq_len=cfg.data.max_length,
            gradient_checkpointing=ft.gradient_checkpointing, attention=cfg.model.attn_implementation,
            deepspeed=ds.enabled, reference_lora=cfg.reference.lora.enabled, reference_lora_r=cfg.reference.lora.r,
            batch_tokens=cfg.scoring.batch_tokens, chunk_size=cfg.scoring.chunk_size,
            reduce_bucket_size=ds.reduce_bucket_size,
        )
    overrides = dict(gpus_per_node=args.gpus_per_node, zero_stage=args.zero_stage, offload=args.offload,
                     lora=args.lora, lora_r=args.lora_r, micro_batch_size=args.micro_batch, seq_len=args.seq_len,
                     gradient_checkpointing=args.ckpt)
    s.update({k: v for k, v in overrides.items() if v is not None})
    return s


def run_plan(args: argparse.Namespace) -> int:
    """The ``forgetting-ray plan`` command: the chosen setting marked '*' among the usual alternatives."""
    s = _settings_from_args(args)
    shape = model_shape(s["model"], lora_targets=s["lora_targets"])
    if args.cpu:
        return _print_cpu_plan(args, s, shape)
    common = dict(micro_batch_size=s["micro_batch_size"], seq_len=s["seq_len"], lora_r=s["lora_r"],
                  gradient_checkpointing=s["gradient_checkpointing"], attention=s["attention"], shape=shape)
    chosen = plan(s["model"], args.nodes, s["gpus_per_node"], lora=s["lora"], zero_stage=s["zero_stage"],
                  offload=s["offload"], **common)
    if args.json:
        print(json.dumps(chosen.to_dict(), indent=2))
        return 0
    grid = [(lora, stage, off) for lora in (True, False) for stage in (2, 3)
            for off in (("none", "optimizer", "all") if stage == 3 else ("none", "optimizer"))]
    rows = [plan(s["model"], args.nodes, s["gpus_per_node"], lora=lo, zero_stage=st, offload=off, **common)
            for lo, st, off in grid]
    if chosen not in rows:
        rows.insert(0, chosen)
    print(plan_table(rows, gpu_memory_gib=args.gpu_memory_gib or _cluster_gpu_gib(args.address), mark=chosen))
    return 0


def _print_cpu_plan(args: argparse.Namespace, s: dict[str, Any], shape: ModelShape) -> int:
    """``plan --cpu``: host memory of one training worker and of one scoring actor, by part."""
    workers = s["gpus_per_node"] * args.nodes
    train = host_training_memory(shape, workers=workers, lora=s["lora"], lora_r=s["lora_r"], zero_stage=s["zero_stage"],
                                 micro_batch_size=s["micro_batch_size"], seq_len=s["seq_len"],
                                 gradient_checkpointing=s["gradient_checkpointing"], deepspeed=s["deepspeed"],
                                 reduce_bucket_size=s["reduce_bucket_size"])
    score = scoring_actor_memory(shape, adapter_reference=s["reference_lora"], lora_r=s["reference_lora_r"],
                                 batch_tokens=s["batch_tokens"], max_length=s["seq_len"], chunk_size=s["chunk_size"])
    if args.json:
        print(json.dumps({"training_worker": train.parts, "scoring_actor": score.parts, "workers": workers}, indent=2))
        return 0
    mode = f"LoRA r{s['lora_r']}" if s["lora"] else "full"
    engine = f"ZeRO-{s['zero_stage']}" if s["deepspeed"] else "DDP"
    print(f"{shape.name}: {shape.params / 1e9:.2f}B params; on CPUs, fp32; {mode}, {engine}, {workers} workers, "
          f"micro-batch {s['micro_batch_size']} x {s['seq_len']} tokens")
    for name, mem in (("training worker", train), ("scoring actor", score)):
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in mem.parts.items())
        print(f"{name:<16} {_gib(mem.total):>6} GiB  ({parts})")
    if not s["lora"] and s["deepspeed"]:
        print("full fine-tune: DeepSpeed's parts measured within 2.5 % at reduced depth (bench/bench_host_memory.py); "
              f"glibc's allocator may keep 0.10-0.20 GiB per layer more ({shape.num_layers} layers here)")
    return 0


def _cluster_gpu_gib(address: str | None) -> float | None:
    """The smallest GPU memory of the Ray cluster at ``address`` (or $RAY_ADDRESS); None without a cluster."""
    import os

    if not (address or os.environ.get("RAY_ADDRESS")):
        return None
    read = smallest_gpu_gib(cluster_gpus(init_ray(address)))
    if read is None:
        print("plan: the Ray cluster has no GPU node up to read the GPUs' memory from; pass --gpu-memory-gib",
              file=sys.stderr)
        return None
    print(f"plan: GPU memory read from the cluster: {read[1]}", file=sys.stderr)
    return read[0]


def main_plan(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m forgetting_ray.plan MODEL [--nodes N --gpus-per-node G ...]``."""
    parser = add_plan_arguments(argparse.ArgumentParser(prog="forgetting-ray plan", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        return run_plan(args)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_plan())
