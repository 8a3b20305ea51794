"""The export folder's format, and what identifies a model in a cache key.

Layout of an export folder (written and validated by :func:`forgetting_ray.train.export.export_model`):

    merged/        full HF folder: safetensors in the chosen dtype, config.json, tokenizer
    adapter/       PEFT LoRA adapter (adapter_model.safetensors, adapter_config.json) + tokenizer,
                   only when the model was trained with LoRA
    manifest.json  sha256 of every file, training config, base model, dtype, validation figures;
                   written last, so its presence means the export is complete

:func:`resolve` turns a model location (an export folder, a PEFT adapter folder, a plain Hugging Face
folder) into what to load; :func:`model_identity` is the one description of a model that every stage's
cache key uses.  A format module: no Ray, no stages, nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import aliases
from .errors import UserError
from .store import atomic_write_json, cache_root, content_hash, exists, file_sha256, is_uri, join_storage, local_copy

MANIFEST = "manifest.json"
MERGED = "merged"
ADAPTER = "adapter"
PLAIN = "plain"
FORMAT_VERSION = 1

# Besides the weights, what fixes a model's numbers and token ids: the configs the loaders read and
# the tokenizer's files.
CONFIG_FILES = frozenset({"config.json", "generation_config.json", "adapter_config.json"})
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
})
_HASH_MEMO_FILE = "file_hashes.json"  # under the node-local cache root: it names this node's paths
# A file whose mtime and ctime both lie less than this before it was hashed may change again within the
# filesystem's timestamp granularity without its stamp changing: such a hash is not remembered (git's
# "racy" entries).  One old time is enough: the next write moves both to now.
_RACY_NS = 2_000_000_000


class ExportError(UserError, RuntimeError):
    """The export could not be written, or a folder is not a complete forgetting-ray export."""


@dataclass(frozen=True)
class ModelSource:
    """What to load for a model location."""

    mode: Literal["adapter", "merged", "plain"]  # ADAPTER: a base model plus this LoRA adapter
    path: str  # the adapter folder, or a full HF folder (a local path or a URI)
    export_dir: str | None  # the export folder when one was given
    tokenizer_dir: str | None  # the folder holding the model's tokenizer, when it ships one


# ------------------------------------------------------------------------------------------
# what to load
# ------------------------------------------------------------------------------------------
def _is_file(location: str, *parts: str) -> bool:
    if is_uri(location):
        return exists(join_storage(location, *parts))
    return Path(location, *parts).is_file()


def _sub(location: str, name: str) -> str:
    return join_storage(location, name) if is_uri(location) else str(Path(location) / name)


def _tokenizer_dir(*candidates: str) -> str | None:
    return next((d for d in candidates if _is_file(d, "tokenizer.json") or _is_file(d, "tokenizer_config.json")), None)


def resolve(location: str | Path, *, prefer: Literal["adapter", "merged"] = MERGED) -> ModelSource | None:
    """What to load for ``location`` (a local folder or a URI).

    An export folder gives its ``adapter/`` with ``prefer="adapter"`` (one copy of the base weights,
    the LoRA toggled) when it has one, else its ``merged/``; a PEFT adapter folder gives itself as an
    adapter; a Hugging Face folder with config.json gives itself.  None for anything else (a hub id,
    a missing or foreign folder): each caller decides whether that is an error.
    """
    if prefer not in (ADAPTER, MERGED):
        raise ValueError(f"prefer must be {ADAPTER!r} or {MERGED!r}, got {prefer!r}")
    loc = str(location)
    adapter, merged = _sub(loc, ADAPTER), _sub(loc, MERGED)
    if prefer == ADAPTER and _is_file(adapter, "adapter_config.json"):
        return ModelSource(ADAPTER, adapter, loc, _tokenizer_dir(adapter, merged))
    if _is_file(merged, "config.json"):
        return ModelSource(MERGED, merged, loc, _tokenizer_dir(merged))
    if _is_file(loc, "adapter_config.json"):
        return ModelSource(ADAPTER, loc, None, _tokenizer_dir(loc))
    if _is_file(loc, "config.json"):
        return ModelSource(PLAIN, loc, None, _tokenizer_dir(loc))
    return None


# ------------------------------------------------------------------------------------------
# the manifest
# ------------------------------------------------------------------------------------------
def file_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` except the manifest, by relative path."""
    folder = Path(folder)
    return {
        str(f.relative_to(folder)): file_sha256(f)
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``folder``'s manifest: ``manifest`` plus the format version and every file's sha256."""
    full = {"format": FORMAT_VERSION, **manifest, "files": file_hashes(folder)}
    atomic_write_json(Path(folder) / MANIFEST, full)
    return full


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """An export's manifest; :class:`ExportError` when ``folder`` is not a (complete) export."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{folder} is not a forgetting-ray export: {MANIFEST} is missing")
    return json.loads(path.read_text())


# Fields of config.json that fix a model's architecture: a fine-tune keeps every one of its base's.
ARCHITECTURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "intermediate_size")


def _architecture(config_file: Path) -> dict[str, Any] | None:
    if not config_file.is_file():
        return None
    cfg = json.loads(config_file.read_text())
    return {k: cfg[k] for k in ARCHITECTURE_FIELDS if k in cfg}


def check_export_base(export_dir: str | Path | None, base: str | Path, *, revision: str | None = None) -> None:
    """An export used beside ``base`` (the score stage's reference) must have been trained from ``base``.

    The manifest records the base's :func:`model_identity` (``train_config.base_identity``); an export written
    before that field, or by hand, is checked by the architecture in ``merged/config.json`` against the
    base's ``config.json`` instead.  ``export_dir`` None (a plain or PEFT folder, not an export): nothing to check.
    Raises :class:`ExportError` naming the export, the base it was trained from and the configured one.
    """
    if export_dir is None or is_uri(export_dir):
        return
    folder = Path(export_dir)
    manifest = read_manifest(folder) if (folder / MANIFEST).is_file() else {}
    trained_from = manifest.get("base_model") or manifest.get("base_model_path") or "another model"
    recorded = (manifest.get("train_config") or {}).get("base_identity")
    if recorded:
        recorded = {k: v for k, v in recorded.items() if k != "tokenizer"}  # the tokenizer is checked on its own
        if recorded != model_identity(base, revision=revision):
            raise ExportError(
                f"reference export {folder} was trained from a different base model ({trained_from}; "
                f"{MANIFEST} train_config.base_identity) than model.name_or_path {str(base)!r}: score with the "
                "base it was trained from, or re-run the reference stage with this model")
        return
    ours = _architecture(Path(base) / "config.json") if Path(base).is_dir() else None
    theirs = _architecture(folder / MERGED / "config.json")
    if ours is None or theirs is None:
        return
    differ = [f"{k}: {theirs[k]!r} vs {ours[k]!r}" for k in ARCHITECTURE_FIELDS if k in ours and k in theirs
              and ours[k] != theirs[k]]
    if differ:
        raise ExportError(
            f"reference export {folder} was trained from a different base model ({trained_from}) than "
            f"model.name_or_path {str(base)!r}: {MERGED}/config.json differs in {'; '.join(differ)}; score with "
            "the base it was trained from, or re-run the reference stage with this model")


# ------------------------------------------------------------------------------------------
# identity
# ------------------------------------------------------------------------------------------
def model_identity(
    location: str | Path, *, revision: str | None = None, tokenizer: str | Path | None = None
) -> dict[str, Any]:
    """What identifies a model in every cache key (score, reference/train runs and their checkpoints, eval).

    By content, never by where it lies on this node (a bucket run resumed from another head, or a copy
    of the model in another folder, keeps its keys): a built-in alias by its name; an export folder by
    its manifest's list of file hashes (O(1) in model size); any other local folder by the sha256 of
    its configs, tokenizer files and weights (see :func:`_content_hashes`); a URI as this node's fetched
    copy; anything else is a hub id, keyed by id and ``revision``.  ``tokenizer``: a tokenizer loaded
    from elsewhere than the model, identified the same way.
    """
    identity = _identity(location, revision)
    if tokenizer is not None and str(tokenizer) != str(location):
        identity["tokenizer"] = _identity(tokenizer, revision)
    return identity


def _identity(location: str | Path, revision: str | None) -> dict[str, Any]:
    loc = str(location)
    if loc in aliases.ALIASES:
        return {"alias": loc}
    if is_uri(loc):
        loc = str(local_copy(loc))  # what every loader reads; fetched once per node
    folder = Path(loc).expanduser()
    if not folder.is_dir():
        return {"hub_id": loc, "revision": revision or "main"}
    alias = aliases.alias_of_folder(folder)
    if alias:
        return {"alias": alias}
    if (folder / MANIFEST).is_file():
        # the manifest lists the sha256 of every file the export wrote; its other fields (time, node-local
        # paths, timings) would make a copied or re-written export of the same files look different
        return {"export": content_hash(read_manifest(folder)["files"], length=64)}
    return {"files": _content_hashes(folder)}


def _defines_model(f: Path) -> bool:
    return (f.name in CONFIG_FILES or f.name in TOKENIZER_FILES
            or f.name.endswith((".safetensors", ".safetensors.index.json")))


def _content_hashes(folder: Path) -> dict[str, str]:
    """sha256 of the files of ``folder`` (and of an export layout's sub-folders, for an export without
    its manifest) that define a model, by relative name.

    Every weight file is hashed in full, not named by its size as a cheap stand-in: a fine-tune saved
    over the same architecture keeps every size, and a stale stage would be reused.  The cost (a 13B
    model in bf16 is ~26 GB, under a minute at disk speed) is paid once per node and file: the hashes
    are remembered by path and stat stamp, as git's index does."""
    files = [f for sub in (folder, folder / MERGED, folder / ADAPTER) if sub.is_dir()
             for f in sorted(sub.iterdir()) if f.is_file() and _defines_model(f)]
    return dict(zip((f.relative_to(folder).as_posix() for f in files), _memo_sha256(files)))


def _memo_sha256(files: list[Path]) -> list[str]:
    memo_file = cache_root() / _HASH_MEMO_FILE
    memo = _read_memo(memo_file)
    learned: dict[str, Any] = {}
    out = []
    for f in files:
        st = f.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        key = str(f.resolve())
        hit = memo.get(key)
        if hit and hit["stamp"] == stamp:
            out.append(hit["sha256"])
            continue
        out.append(file_sha256(f))
        if time.time_ns() - min(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
            learned[key] = {"stamp": stamp, "sha256": out[-1]}
    if learned:
        _write_memo(memo_file, learned)
    return out


def _read_memo(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or torn by a crash: hash again
        return {}


def _write_memo(path: Path, learned: dict[str, Any]) -> None:
    memo = {**_read_memo(path), **learned}  # re-read: another process may have added entries meanwhile
    memo = {k: v for k, v in memo.items() if os.path.exists(k)}
    with contextlib.suppress(OSError):  # an unwritable cache only costs hashing again
        atomic_write_json(path, memo)
