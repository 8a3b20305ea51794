"""Consolidated Hugging Face export of a trained model, validated before it is declared done.

``out_dir`` gets the layout :mod:`forgetting_ray.exports` describes (``merged/``, ``adapter/`` with
LoRA, the manifest), built in a temporary sibling and renamed into place in one step.

:func:`export_model` is a collective: every rank calls it.  Under ZeRO-3 each rank holds a slice of
every weight, so the slices are gathered module by module with ``GatheredParameters`` (every rank
takes part in every gather) and rank 0 keeps a CPU copy.  Nothing is ever saved from the live
model: PEFT's ``save_pretrained`` under ZeRO-3 writes ``[0]``-shaped tensors without complaint
(STACK_NOTES Exp 2).  Rank 0 rebuilds the model from the copy (``merge_and_unload`` for LoRA),
writes it, checks every tensor, reloads both routes (``from_pretrained(merged/)`` and base +
adapter) and compares their logits with the live trained model on fixed inputs.  Only then is the
folder renamed into place; the other ranks learn the outcome by broadcast and raise the same error.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist
from safetensors import safe_open

from ..exports import ADAPTER, MERGED, ExportError, write_manifest
from ..models import resolve_model_path, tokenizer_fingerprint
from ..store import atomic_dir

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Allowed |export - trained| on the probe logits: atol + rtol * max|trained logit|.  The reload
# computes in float32, so the slack is the export dtype's weight rounding plus, on GPU, the live
# model's 16-bit arithmetic (several tenths of a logit on an 8B model).
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-5),
    "bfloat16": (5e-2, 5e-2),
    "float16": (2e-2, 2e-2),
}
PROBE_BATCH, PROBE_LENGTH, PROBE_SEED = 2, 16, 1234


class ExportValidationError(ExportError):
    """The written export is wrong: an empty, all-zero or non-finite tensor, or logits that differ."""


# ------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------
def find_causal_lm(obj: torch.nn.Module) -> torch.nn.Module:
    """The PEFT or Hugging Face model inside a DeepSpeed engine, DDP or another ``.module`` wrapper.

    Unlike ``scoring.unwrap_causal_lm`` this stops at a ``PeftModel``: the export needs the adapter.
    """
    # peft, transformers, deepspeed and huggingface_hub's downloads stay lazy: each takes seconds to
    # import, and the driver imports this module through the train loop without ever exporting
    from peft import PeftModel
    from transformers import PreTrainedModel

    m = obj
    for _ in range(16):
        if isinstance(m, (PeftModel, PreTrainedModel)):
            return m
        inner = getattr(m, "module", None)
        if not isinstance(inner, torch.nn.Module) or inner is m:
            break
        m = inner
    raise TypeError(
        f"no Hugging Face or PEFT model inside {type(obj).__name__}: pass the model, its DDP wrapper or the "
        "DeepSpeed engine (wrappers must expose the inner model as .module)"
    )


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_zero3(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _source_kind(obj: torch.nn.Module) -> dict[str, Any]:
    if hasattr(obj, "zero_optimization_stage") and callable(obj.zero_optimization_stage):
        return {"engine": "deepspeed", "zero_stage": int(obj.zero_optimization_stage())}
    if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
        return {"engine": "ddp"}
    return {"engine": "plain"}


@contextlib.contextmanager
def _hf_zero3_off() -> Iterator[None]:
    """Let rank 0 build and load ordinary models while a ZeRO-3 HfDeepSpeedConfig is alive.

    transformers consults a module-global weakref: with it set, ``from_pretrained`` would wrap the
    load in ``zero.Init`` and wait for ranks that are not loading anything.
    """
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover - transformers always ships the module
        yield
        return
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def probe_inputs(
    vocab_size: int, *, batch: int = PROBE_BATCH, length: int = PROBE_LENGTH, seed: int = PROBE_SEED
) -> torch.Tensor:
    """Fixed token ids, identical on every rank (ZeRO-3 forwards are collectives)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g)


def _model_device(model: torch.nn.Module) -> torch.device:
    if _is_zero3(model):  # partitioned params report no useful device
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    return next(model.parameters()).device


@torch.no_grad()
def model_logits(model: torch.nn.Module, ids: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """float32 CPU logits of ``model`` on ``ids`` in eval mode (no dropout); restores the train flag."""
    device = device or _model_device(model)
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device), use_cache=False)
        return out.logits.float().cpu()
    finally:
        model.train(was_training)


def compare_logits(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    diff = (logits.float() - reference.float()).abs()
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_logit": float(reference.abs().max()),
    }


def tolerance(dtype: str, atol: float | None = None, rtol: float | None = None) -> dict[str, float]:
    a, r = TOLERANCES[dtype]
    return {"atol": a if atol is None else atol, "rtol": r if rtol is None else rtol}


# ------------------------------------------------------------------------------------------
# gather (collective) and rebuild (rank 0)
# ------------------------------------------------------------------------------------------
def gather_cpu_state(model: torch.nn.Module, *, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full parameters and buffers of ``model`` as CPU tensors on rank 0 (empty dicts elsewhere).

    Every rank must call this with the same model.  Under ZeRO-3 the parameters are gathered one
    module at a time so no rank ever holds more than one module's full weights besides its shard.
    Tied parameters are gathered once and appear under each of their names (same tensor).
    """
    zero3 = _is_zero3(model)
    if zero3:
        import deepspeed

    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    params: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for p in own)
        gather = deepspeed.zero.GatheredParameters(own, modifier_rank=None) if zero3 else contextlib.nullcontext()
        with gather:
            if rank == 0:
                for p in own:
                    t = p.detach().to("cpu", copy=True)
                    for n in names[id(p)]:
                        params[n] = t
    buffers: dict[str, torch.Tensor] = {}
    if rank == 0:  # ZeRO never partitions buffers
        buffers = {n: b.detach().to("cpu", copy=True) for n, b in model.named_buffers(remove_duplicate=False)}
    return params, buffers


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # a ZeRO-3 partition reports numel() == 0


def _adapter_name(peft_model) -> str:
    names = list(peft_model.peft_config)
    if len(names) != 1:
        raise ExportError(f"expected one LoRA adapter, the model has {len(names)}: {names}")
    return names[0]


def rebuild_cpu_model(
    live: torch.nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]
) -> torch.nn.Module:
    """A CPU copy of ``live`` (a HF or PEFT model) holding the gathered tensors; built on meta, no init."""
    from peft import PeftModel, get_peft_model

    is_peft = isinstance(live, PeftModel)
    base = live.get_base_model() if is_peft else live
    with _hf_zero3_off(), torch.device("meta"):
        model = type(base)(copy.deepcopy(base.config))
        if is_peft:
            name = _adapter_name(live)
            model = get_peft_model(model, copy.deepcopy(live.peft_config[name]), adapter_name=name)
    expected = model.state_dict().keys()
    full = {**buffers, **params}
    missing = [k for k in expected if k not in full]
    if missing:
        raise ExportError(f"gathered state lacks {len(missing)} tensor(s) of the model, e.g. {missing[:5]}")
    wrong = [
        f"{k}: gathered {tuple(full[k].shape)}, model {tuple(v.shape)}"
        for k, v in model.state_dict().items()
        if tuple(full[k].shape) != tuple(v.shape)
    ]
    if wrong:  # a [0]-shaped tensor here is an ungathered ZeRO-3 partition
        raise ExportError(
            "gathered tensors have the wrong shape (ZeRO-3 partitions not gathered?): " + "; ".join(wrong[:5])
        )
    model.load_state_dict({k: full[k] for k in expected}, strict=True, assign=True)
    for name, buf in buffers.items():  # non-persistent buffers (rotary inv_freq, masks) are not in state_dict
        if name not in expected:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = buf
    (model.get_base_model() if is_peft else model).tie_weights()  # re-tie by identity after assign
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ExportError(f"tensors left uninitialised after rebuilding the model: {left[:5]}")
    return model.eval()


# ------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------
def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _base_tensor_is_zero(base_model_path: str, key: str) -> bool:
    """Is ``key`` all-zero in the base checkpoint too (then training did not zero it)?  False if unknown."""
    folder = Path(base_model_path)
    if not folder.is_dir():  # a hub id: look in the local cache only, never download
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(base_model_path, local_files_only=True, allow_patterns=["*.safetensors"]))
        except Exception:  # not cached, or not a repo id: the zero tensor stays an error
            return False
    for f in _safetensors_files(folder):
        with safe_open(str(f), framework="pt") as st:
            if key in st.keys():
                t = st.get_tensor(key)
                return t.numel() > 0 and not bool(t.any())
    return False


def check_tensors(folder: str | Path, *, base_model_path: str | None = None) -> dict[str, Any]:
    """Every tensor of every safetensors file in ``folder`` is non-empty, finite and not all zero.

    Exceptions, reported in the result: all-zero biases, and (merged models only) tensors that are
    all zero in the base checkpoint as well.  Raises :class:`ExportValidationError` naming the tensor.
    """
    folder = Path(folder)
    files = _safetensors_files(folder)
    if not files:
        raise ExportValidationError(f"{folder}: no .safetensors files")
    n, numel, zero_ok = 0, 0, []
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                t = st.get_tensor(key)
                where = f"{f.parent.name}/{f.name}:{key} {tuple(t.shape)}"
                if t.numel() == 0:
                    raise ExportValidationError(f"empty tensor {where} (an ungathered ZeRO-3 partition?)")
                if not bool(torch.isfinite(t).all()):
                    raise ExportValidationError(f"non-finite values in tensor {where}")
                if not bool(t.any()):
                    if key.endswith(".bias") or (base_model_path and _base_tensor_is_zero(base_model_path, key)):
                        zero_ok.append(key)
                    else:
                        hint = " (LoRA never updated, or saved without gathering)" if "lora_" in key else ""
                        raise ExportValidationError(f"all-zero tensor {where}{hint}")
                n += 1
                numel += t.numel()
    return {"files": [f.name for f in files], "tensors": n, "numel": numel, "zero_tensors_allowed": zero_ok}


def _check_close(route: str, fig: dict[str, float], tol: dict[str, float]) -> None:
    limit = tol["atol"] + tol["rtol"] * fig["max_abs_logit"]
    fig["limit"] = limit
    fig["passed"] = fig["max_abs_diff"] <= limit
    if not fig["passed"]:
        raise ExportValidationError(
            f"{route}: logits of the reloaded export differ from the trained model: max |diff| "
            f"{fig['max_abs_diff']:.3g} > limit {limit:.3g} (atol {tol['atol']:g} + rtol {tol['rtol']:g} x "
            f"max |logit| {fig['max_abs_logit']:.3g}); mean |diff| {fig['mean_abs_diff']:.3g}"
        )


def validate_export(
    folder: str | Path,
    reference_logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    dtype: str,
    base_model_path: str,
    atol: float | None = None,
    rtol: float | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Check an export folder (``merged/`` and, when present, ``adapter/``) against the trained model.

    ``reference_logits`` are the trained model's logits on ``ids``.  Returns the validation figures
    that go into the manifest; raises :class:`ExportValidationError` on the first failed check.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    tol = tolerance(dtype, atol, rtol)
    out: dict[str, Any] = {
        "probe": {"batch": int(ids.shape[0]), "length": int(ids.shape[1]), "seed": PROBE_SEED},
        "tolerance": tol,
        "compute_dtype": "float32",
    }
    out["tensors"] = {MERGED: check_tensors(folder / MERGED, base_model_path=base_model_path)}
    has_adapter = (folder / ADAPTER).is_dir()
    if has_adapter:
        out["tensors"][ADAPTER] = check_tensors(folder / ADAPTER)

    with _hf_zero3_off():
        merged = AutoModelForCausalLM.from_pretrained(folder / MERGED, dtype=torch.float32, use_safetensors=True)
        fig = compare_logits(model_logits(merged, ids, torch.device(device)), reference_logits)
        del merged  # one full model in memory at a time
        gc.collect()
        out[MERGED] = fig
        _check_close("merged", fig, tol)
        if has_adapter:
            _validate_adapter(folder, reference_logits, ids, out, tol, base_model_path=base_model_path, device=device)
    return out


def _validate_adapter(folder: Path, reference_logits: torch.Tensor, ids: torch.Tensor, out: dict[str, Any],
                      tol: dict[str, float], *, base_model_path: str, device: str | torch.device) -> None:
    """The base + adapter route against the trained model, and the merged route against training's effect."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32, use_safetensors=True)
    peft = PeftModel.from_pretrained(base, folder / ADAPTER, is_trainable=False)
    fig = compare_logits(model_logits(peft, ids, torch.device(device)), reference_logits)
    with peft.disable_adapter():
        base_logits = model_logits(peft, ids, torch.device(device))
    del peft, base
    gc.collect()
    out[ADAPTER] = fig
    _check_close("base + adapter", fig, tol)
    # How far training moved the logits: the export must sit closer to the trained model than
    # to the base, else the tolerance above was too loose to see a missing merge.
    effect = compare_logits(base_logits, reference_logits)["max_abs_diff"]
    out["training_effect_max_abs_diff"] = effect
    if effect > out[MERGED]["limit"] and out[MERGED]["max_abs_diff"] > 0.5 * effect:
        raise ExportValidationError(
            f"merged export is about as far from the trained model ({out[MERGED]['max_abs_diff']:.3g}) as the "
            f"base model is ({effect:.3g}): was the adapter merged?"
        )


# ------------------------------------------------------------------------------------------
# write (rank 0)
# ------------------------------------------------------------------------------------------
def _write_export(
    live: torch.nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    tokenizer: Any,
    tmp: Path,
    *,
    lora: bool,
    dtype: str,
    base_model_path: str,
    max_shard_size: str,
) -> dict[str, Any]:
    trainable = [n for n, p in live.named_parameters() if p.requires_grad]
    model = rebuild_cpu_model(live, params, buffers)
    params.clear()  # the model owns the tensors now; drop the second reference
    torch_dtype = DTYPES[dtype]
    info: dict[str, Any] = {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(_numel(p) for p in live.parameters() if p.requires_grad),
    }
    if lora:
        name = _adapter_name(model)
        model.peft_config[name].base_model_name_or_path = base_model_path
        model.peft_config[name].inference_mode = True
        state = model.state_dict()
        adapter_state = {k: state[k].to(torch_dtype) for k in trainable}
        model.save_pretrained(tmp / ADAPTER, state_dict=adapter_state, save_embedding_layers=False)
        tokenizer.save_pretrained(tmp / ADAPTER)
        del state, adapter_state
        model = model.merge_and_unload()  # merged in the training dtype, rounded once below
    model.to(torch_dtype)
    model.save_pretrained(tmp / MERGED, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(tmp / MERGED)
    return info


@dataclass
class _Gathered:
    """What the collectives leave behind: the probe, the live model's logits on it, and (rank 0) its state."""

    ids: torch.Tensor
    reference: torch.Tensor
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    seconds: float

    def release(self) -> None:
        self.params.clear()
        self.buffers.clear()
        gc.collect()


def export_model(
    engine_or_model: torch.nn.Module,
    tokenizer: "PreTrainedTokenizerBase | str | Path",
    out_dir: str | Path,
    *,
    lora: bool,
    dtype: str,
    base_model_path: str,
    train_config: dict[str, Any],
    overwrite: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write and validate ``out_dir`` (see the module docstring).  Collective: call on every rank.

    ``engine_or_model``: a HF/PEFT causal LM, its DDP wrapper, or a DeepSpeed engine (ZeRO 0-3)
    whose ``.module`` chain leads to one.  ``dtype``: 'float32', 'bfloat16' or 'float16'.
    ``base_model_path``: the folder or hub id the adapter applies to (goes into adapter_config.json).
    ``tokenizer``: saved next to the weights (a tokenizer object, or a folder to load it from).
    ``atol``/``rtol``: override :data:`TOLERANCES` for the logits comparison.
    ``max_shard_size``: the largest file of ``merged/`` (transformers' notation, e.g. "2GB").
    Returns ``out_dir`` on every rank once rank 0 has written and validated it; raises
    :class:`ExportError` on every rank when it failed (nothing is left at ``out_dir`` then).
    """
    if dtype not in DTYPES:
        raise ValueError(f"export dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    live = _live_model(engine_or_model, lora=lora)
    rank, world = _rank_world()
    t0 = time.perf_counter()
    gathered = _gather(live, rank=rank, t0=t0)

    error: str | None = None
    failure: Exception | None = None
    if rank == 0:
        try:
            _write_validated(engine_or_model, live, gathered, tokenizer, out_dir, lora=lora, dtype=dtype,
                             base_model_path=base_model_path, train_config=train_config, overwrite=overwrite,
                             atol=atol, rtol=rtol, world=world, t0=t0, max_shard_size=max_shard_size)
        except Exception as e:  # reported to every rank below, then raised everywhere
            error, failure = f"{type(e).__name__}: {e}", e
            if world == 1:
                raise
            log.exception("export to %s failed", out_dir)
        finally:
            gathered.release()
    _raise_on_every_rank(error, failure, out_dir, world)
    return out_dir


def _live_model(engine_or_model: torch.nn.Module, *, lora: bool) -> torch.nn.Module:
    """The HF or PEFT model to export, checked against ``lora``."""
    from peft import PeftModel

    live = find_causal_lm(engine_or_model)
    if lora != isinstance(live, PeftModel):
        raise ExportError(
            f"lora={lora} but the model {'is' if isinstance(live, PeftModel) else 'is not'} a PEFT model"
        )
    return live


def _gather(live: torch.nn.Module, *, rank: int, t0: float) -> _Gathered:
    """The collectives, identical on every rank and before anything else: the probe forward and the gathers."""
    ids = probe_inputs(int(live.config.get_text_config().vocab_size))
    reference = model_logits(live, ids)
    params, buffers = gather_cpu_state(live, rank=rank)
    return _Gathered(ids, reference, params, buffers, time.perf_counter() - t0)


def _write_validated(
    engine_or_model: torch.nn.Module,
    live: torch.nn.Module,
    gathered: _Gathered,
    tokenizer: Any,
    out_dir: Path,
    *,
    lora: bool,
    dtype: str,
    base_model_path: str,
    train_config: dict[str, Any],
    overwrite: bool,
    atol: float | None,
    rtol: float | None,
    world: int,
    t0: float,
    max_shard_size: str,
) -> None:
    """Rank 0: write the export in a temporary folder, validate it, add the manifest, rename it into place."""
    base_model = base_model_path
    base_model_path = resolve_model_path(base_model)  # alias -> cached folder, so the adapter reloads
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        info = _write_export(live, gathered.params, gathered.buffers, tokenizer, tmp, lora=lora, dtype=dtype,
                             base_model_path=base_model_path, max_shard_size=max_shard_size)
        gc.collect()  # the CPU copy (PEFT holds reference cycles) before the reloads
        t_write = time.perf_counter() - t0 - gathered.seconds
        validation = validate_export(tmp, gathered.reference, gathered.ids, dtype=dtype,
                                     base_model_path=base_model_path, atol=atol, rtol=rtol)
        write_manifest(tmp, {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base_model_path": base_model_path,
            "base_model": base_model,
            "dtype": dtype,
            "lora": lora,
            "layout": {MERGED: f"{MERGED}/", **({ADAPTER: f"{ADAPTER}/"} if lora else {})},
            "source": {**_source_kind(engine_or_model), "world_size": world, "zero3_gathered": _is_zero3(live)},
            "model": {"class": type(live.get_base_model() if lora else live).__name__, **info},
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "train_config": train_config,
            "validation": validation,
            "timings_s": {
                "gather": round(gathered.seconds, 3),
                "write": round(t_write, 3),
                "validate": round(time.perf_counter() - t0 - gathered.seconds - t_write, 3),
            },
        })
    log.info("exported %s (merged max |diff| %.3g)", out_dir, validation[MERGED]["max_abs_diff"])


def _raise_on_every_rank(error: str | None, failure: Exception | None, out_dir: Path, world: int) -> None:
    """Rank 0 broadcasts its outcome: the other ranks raise the same error, or return once the export is in place."""
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        cls = ExportValidationError if error.startswith("ExportValidationError") else ExportError
        raise cls(f"export to {out_dir} failed on rank 0: {error}") from failure

