"""Run directory, content-addressed stage outputs and atomic writes.

Every stage writes under ``<run_dir>/<stage>/<key>/`` where ``key`` hashes everything that changes
the stage's numbers.  Files and whole folders are written to a temporary sibling and renamed, so an
interrupted stage never leaves a partial output that a later run would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

DONE_MARKER = "_SUCCESS.json"


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path; on success it is renamed to ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` in one rename, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists")
            old = _tmp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_hash(obj: Any, length: int = 16) -> str:
    """Stable hex digest of a JSON-able object (dict key order does not matter)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:length]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_sha256(folder: str | Path, pattern: str = "*") -> str:
    """Hash of every file (relative name + content) under ``folder``, in sorted order."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob(pattern) if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def stage_dir(run_dir: str | Path, stage: str, key: str) -> Path:
    return Path(run_dir) / stage / key


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / DONE_MARKER).is_file()


def mark_complete(folder: str | Path, info: dict[str, Any]) -> Path:
    return atomic_write_json(Path(folder) / DONE_MARKER, info)


def read_done(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / DONE_MARKER).read_text())


# ------------------------------------------------------------------------------------------------
# storage that may be object storage
# ------------------------------------------------------------------------------------------------
def is_uri(path: str | Path) -> bool:
    """True for ``s3://``, ``gs://``, ``abfs://``, ``file://``...: storage opened through ``pyarrow.fs``."""
    return "://" in str(path)


def join_storage(base: str | Path, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (where ``Path`` would mangle ``s3://`` into ``s3:/``)."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base).expanduser().resolve().joinpath(*parts))


class StorageNotWritable(OSError):
    def __init__(self, target: str, reason: str):
        super().__init__(f"{target} is not writable: {reason}")
        self.target, self.reason = target, reason


def probe_storage(path: str | Path) -> str:
    """Create ``path`` (a folder or a URI prefix), write and delete a probe object in it, and return it
    normalised (an absolute path, or the URI unchanged). Raises :class:`StorageNotWritable`."""
    import pyarrow.fs as pafs

    target = str(path) if is_uri(path) else str(Path(path).expanduser().resolve())
    try:
        fs, root = pafs.FileSystem.from_uri(target if is_uri(target) else Path(target).as_uri())
        fs.create_dir(root, recursive=True)
        probe = f"{root.rstrip('/')}/.write-probe-{uuid.uuid4().hex[:12]}"
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except (OSError, ValueError) as e:  # pyarrow raises OSError for I/O and auth, ValueError for bad URIs
        raise StorageNotWritable(target, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    return target
