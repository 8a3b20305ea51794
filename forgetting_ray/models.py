"""Loading Hugging Face causal LMs and tokenizers: local folders, hub ids, built-in aliases, URIs.

Safe defaults: ``trust_remote_code`` off, safetensors only for weights, never resize embeddings to
get a pad token (an existing token becomes the pad id; pad positions carry label -100 anyway).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from . import aliases
from .config import ModelConfig
from .errors import ModelLoadError, UserError
from .store import is_uri, local_copy, portable

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _as_config(model: ModelConfig | str | Path) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    return ModelConfig(name_or_path=str(model))


def resolve_model_path(model: ModelConfig | str | Path) -> str:
    """Alias -> cached local folder; URI (``s3://...``) -> this node's fetched copy; local folder ->
    absolute path; anything else is a hub id."""
    cfg = _as_config(model)

    if cfg.name_or_path in aliases.ALIASES:
        return str(aliases.materialize(cfg.name_or_path, cache_dir=cfg.cache_dir))
    if is_uri(cfg.name_or_path):
        try:
            return str(local_copy(cfg.name_or_path))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot fetch model {cfg.name_or_path}: {e}") from None
    p = Path(cfg.name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} exists but has no config.json: not a Hugging Face model folder")
        return str(p.resolve())
    return cfg.name_or_path


def portable_model_ref(path: str | Path | None) -> str | None:
    """A model location as a process on another node can load it: a folder in a run directory's mirror
    becomes its URI, a converted alias folder its alias name (every node converts its own copy from the
    installed wheel); anything else (a hub id, a shared path) unchanged."""
    if path is None:
        return None
    alias = aliases.alias_of_folder(path)
    return alias or portable(path)


def portable_model(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with :func:`portable_model_ref` applied to the model and the tokenizer."""
    return cfg.model_copy(update={"name_or_path": portable_model_ref(cfg.name_or_path),
                                  "tokenizer": portable_model_ref(cfg.tokenizer)})


def _tokenizer_source(tokenizer: str) -> str:
    # a tokenizer folder has no config.json: only aliases and URIs need resolving
    if tokenizer in aliases.ALIASES or is_uri(tokenizer):
        return resolve_model_path(tokenizer)
    return tokenizer


# Files a tokenizer loads from: a local folder with none of them has no tokenizer (special_tokens_map.json or
# chat_template.jinja alone are not one).
TOKENIZER_SOURCE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                          "spiece.model")


def _require_tokenizer_files(source: str, cfg: ModelConfig) -> None:
    folder = Path(source)
    if not folder.is_dir() or any((folder / f).is_file() for f in TOKENIZER_SOURCE_FILES):
        return
    if cfg.tokenizer:
        raise ModelLoadError(f"model.tokenizer {folder} holds no tokenizer (none of {', '.join(TOKENIZER_SOURCE_FILES)}): "
                             "point model.tokenizer at the folder or hub id of the model's tokenizer")
    raise ModelLoadError(f"model folder {folder} holds no tokenizer (none of {', '.join(TOKENIZER_SOURCE_FILES)}): "
                         "set model.tokenizer to the folder or hub id of its tokenizer, or save the tokenizer into it")


def load_tokenizer(model: ModelConfig | str | Path) -> "PreTrainedTokenizerBase":
    """Load the tokenizer and give it a pad token taken from existing tokens (no new embedding rows)."""
    from transformers import AutoTokenizer

    cfg = _as_config(model)
    source = _tokenizer_source(cfg.tokenizer) if cfg.tokenizer else resolve_model_path(cfg)
    _require_tokenizer_files(source, cfg)
    tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelLoadError(f"tokenizer of {source} has neither a pad nor an eos token to pad with")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # per-token arrays are indexed from position 0 (docs/method.md §2.2)
    return tok


def tokenizer_fingerprint(tok: "PreTrainedTokenizerBase") -> str:
    """Hash of the vocabulary, special tokens and chat template: what fixes the token ids."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode())
    h.update(json.dumps(tok.all_special_tokens, ensure_ascii=False).encode())
    h.update(str(getattr(tok, "chat_template", None) or "").encode())
    h.update(str(tok.eos_token).encode())
    return h.hexdigest()[:16]


class NoGPUVisible(UserError, RuntimeError):
    """A stage configured for GPUs runs in a process that sees no CUDA device."""


def stage_device(wants_gpu: bool, setting: str, *, cpu_stands_in: bool = False) -> "torch.device":
    """The device a stage's process computes on.  One that asked for a GPU (``setting``) and sees no CUDA device
    fails: computing on the CPU instead would look like a run and take days.  ``cpu_stands_in``
    (resources.cpu_stands_in_for_gpu) runs the GPU configuration's code path on the CPU instead."""
    import torch

    if not wants_gpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if cpu_stands_in:
        return torch.device("cpu")
    import os

    raise NoGPUVisible(
        f"{setting} asks for GPUs but this process sees no CUDA device (torch {torch.__version__}, CUDA build "
        f"{torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
        f"install a CUDA build of torch on the GPU nodes, or set {setting} off to run on CPUs "
        "(resources.cpu_stands_in_for_gpu: true rehearses the GPU configuration on CPUs)")


def resolve_dtype(name: str, device: "torch.device | str | None" = None) -> "torch.dtype":
    import torch

    if name == "auto":
        dev = torch.device(device) if device is not None else None
        on_gpu = dev.type == "cuda" if dev is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(
    model: ModelConfig | str | Path,
    *,
    device: "torch.device | str | None" = None,
    dtype: str | None = None,
) -> "PreTrainedModel":
    """Load a causal LM from safetensors with remote code off unless the config allows it."""
    from transformers import AutoModelForCausalLM

    cfg = _as_config(model)
    path = resolve_model_path(cfg)
    torch_dtype = resolve_dtype(dtype or cfg.dtype, device)
    kwargs = dict(
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=torch_dtype,
        use_safetensors=True,
    )
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        m = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelLoadError(f"cannot load model {cfg.name_or_path!r} from {path}: {e}") from e
    if device is not None:
        m = m.to(device)
    return m
