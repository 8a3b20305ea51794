"""Run directory, content-addressed stage outputs and atomic writes, on a local disk or object storage.

Every stage writes under ``<run_dir>/<stage>/<key>/`` where ``key`` hashes everything that changes
the stage's numbers.  Files and whole folders are written to a temporary sibling and renamed, so an
interrupted stage never leaves a partial output that a later run would mistake for a finished one.

``run_dir`` may be a URI that ``pyarrow.fs`` opens (``s3://``, ``gs://``, ``abfs://``; S3-compatible
endpoints through ``AWS_ENDPOINT_URL``).  The stages then work in a node-local *mirror* of it
(:func:`run_root`) and the bucket is the source of truth: every file written through this module is
uploaded when it is written, a stage folder's completion marker is uploaded last (object storage has
no rename, so "the marker exists" is what "done" means there), and :func:`is_complete` asks the
bucket, fetching a finished folder into the mirror, so a run on a fresh node reuses every stage.
Workers on other nodes get the URI (:func:`portable`) and fetch what they read once per node into a
content-addressed cache (:func:`local_copy`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from .errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow.fs as pafs

DONE_MARKER = "_SUCCESS.json"
MIRROR_TAG = ".forgetting-ray-remote"  # in a mirror's root: the URI it mirrors
FETCHED_TAG = ".fetched.json"  # in a fetched copy: what was fetched (written last)
# Object storage answers 503 (slow down), resets connections and times out now and then: each call is tried
# this many times, backing off from RETRY_BASE_S to RETRY_MAX_S (about 15 s in all) before it counts as down.
RETRY_ATTEMPTS = 6
RETRY_BASE_S = 0.5
RETRY_MAX_S = 8.0
# errors no retry mends: fail at once
PERMANENT_ERRORS = ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId", "NoSuchBucket",
                    "NO_SUCH_BUCKET", "SignatureDoesNotMatch")

log = logging.getLogger(__name__)
T = TypeVar("T")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$FORGETTING_RAY_CACHE``, else ``~/.cache/forgetting-ray``: node-local."""
    root = cache_dir or os.environ.get("FORGETTING_RAY_CACHE") or "~/.cache/forgetting-ray"
    return Path(root).expanduser().resolve()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive ``flock``: one process (thread, Ray actor) of a host at a time does what follows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


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
    push(path)
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
    push(path)


@contextlib.contextmanager
def _swapped_in_dir(path: Path, overwrite: bool) -> Iterator[Path]:
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


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` in one rename, on error it is removed."""
    with _swapped_in_dir(Path(path), overwrite) as tmp:
        yield tmp
    push(path)


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
    return run_root(run_dir) / stage / key


def is_complete(folder: str | Path, marker_name: str = DONE_MARKER) -> bool:
    """The folder's completion marker exists; in a mirror, in the bucket (and the folder is fetched)."""
    folder = Path(folder)
    remote = remote_of(folder)
    if remote is None:
        return (folder / marker_name).is_file()
    fs, root = _filesystem(remote)
    try:
        marker = _read_remote(fs, f"{root}/{marker_name}")
    except FileNotFoundError:
        return False
    local_marker = folder / marker_name
    if not (local_marker.is_file() and local_marker.read_bytes() == marker):
        with file_lock(folder.with_name(f".{folder.name}.lock")):
            if not (local_marker.is_file() and local_marker.read_bytes() == marker):
                _download(fs, root, folder)
    return True


def mark_complete(folder: str | Path, info: dict[str, Any]) -> Path:
    """Write the completion marker last: in a mirror, after every file of the folder is in the bucket."""
    folder = Path(folder)
    upload_tree(folder)
    return atomic_write_json(folder / DONE_MARKER, info)


def unmark_complete(folder: str | Path) -> None:
    """Remove the completion marker (first from the bucket, for a mirrored folder)."""
    folder = Path(folder)
    remote = remote_of(folder)
    if remote is not None:
        fs, root = _filesystem(remote)
        with contextlib.suppress(FileNotFoundError):
            fs.delete(f"{root}/{DONE_MARKER}")
    (folder / DONE_MARKER).unlink(missing_ok=True)


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
        probe = f"{root.rstrip('/')}/.write-probe-{uuid.uuid4().hex[:12]}"

        def write_and_delete() -> None:  # a pre-flight check: a few tries, so a wrong endpoint fails fast
            fs.create_dir(root, recursive=True)
            with fs.open_output_stream(probe) as out:
                out.write(b"ok")
            fs.delete_file(probe)
        retried("write a probe into", target, write_and_delete, attempts=3)
    except StorageError as e:
        raise StorageNotWritable(target, str(e).rsplit(": ", 1)[-1]) from None
    except (OSError, ValueError) as e:  # pyarrow raises OSError for I/O and auth, ValueError for bad URIs
        raise StorageNotWritable(target, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    return target


# ------------------------------------------------------------------------------------------------
# a run directory on object storage: the node-local mirror
# ------------------------------------------------------------------------------------------------
def run_root(run_dir: str | Path) -> Path:
    """The local folder the stages work in: ``run_dir`` itself, or for a URI its node-local mirror."""
    if not is_uri(run_dir):
        return Path(run_dir).expanduser().resolve()
    uri = str(run_dir).rstrip("/")
    root = cache_root() / "mirrors" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    tag = root / MIRROR_TAG
    if not tag.is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(tag)
        tmp.write_text(uri)
        os.replace(tmp, tag)
    return root


def remote_of(path: str | Path) -> str | None:
    """The URI that a path inside a mirror stands for; None for any other path."""
    p = Path(path).expanduser().absolute()
    for parent in (p, *p.parents):
        tag = parent / MIRROR_TAG
        if tag.is_file():
            rel = p.relative_to(parent).as_posix()
            uri = tag.read_text().strip()
            return uri if rel == "." else f"{uri}/{rel}"
    return None


def local_path(location: str | Path, run_dir: str | Path) -> Path:
    """Where ``location`` (a local path, or a URI inside the bucket-backed ``run_dir``, as
    :func:`portable` made it on another node) lives in this node's mirror."""
    loc = str(location)
    if not is_uri(loc):
        return Path(loc)
    base = str(run_dir).rstrip("/")
    if is_uri(base) and (loc == base or loc.startswith(base + "/")):
        return run_root(base) / loc[len(base):].lstrip("/")
    raise ValueError(f"{loc} is not inside the run directory {run_dir}")


def exists(location: str | Path) -> bool:
    """A local path exists, or a URI names an object or a prefix holding objects."""
    if not is_uri(location):
        return Path(location).exists()
    import pyarrow.fs as pafs

    fs, root = _filesystem(str(location))
    return fs.info(root).type != pafs.FileType.NotFound


def _fetched_uri(path: str | Path) -> str | None:
    """The URI a path inside a :func:`local_copy` folder was fetched from; None for any other path."""
    p = Path(path).expanduser().absolute()
    fetched = cache_root() / "fetched"
    if not p.is_relative_to(fetched) or p == fetched:
        return None
    copy = fetched / p.relative_to(fetched).parts[0]
    tag = copy / FETCHED_TAG
    if not tag.is_file():
        return None
    rel = p.relative_to(copy).as_posix()
    uri = json.loads(tag.read_text())["uri"].rstrip("/")
    return uri if rel == "." else f"{uri}/{rel}"


def portable(path: str | Path) -> str:
    """What to hand a process on another node (or name a model by in a key): the URI of a mirrored or
    fetched path, else the path unchanged."""
    return remote_of(path) or _fetched_uri(path) or str(path)


class StorageError(UserError, OSError):
    """Object storage kept failing one operation after every retry."""


def retried(operation: str, target: str, call: Callable[[], T], attempts: int | None = None) -> T:
    """``call()``, tried again with jittered exponential backoff while it raises a transient storage error;
    then :class:`StorageError` naming the operation and the object.  A missing object is an answer, not a fault."""
    attempts = attempts or RETRY_ATTEMPTS
    delay = RETRY_BASE_S
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except FileNotFoundError:
            raise
        except OSError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if attempt == attempts or any(code in str(e) for code in PERMANENT_ERRORS):
                raise StorageError(f"object storage: {operation} {target} failed "
                                   f"{'after ' + str(attempt) + ' attempts' if attempt > 1 else ''}: {first}") from None
            log.debug("object storage: %s %s failed (attempt %d): %s; retrying", operation, target, attempt, first)
            time.sleep(delay * (1 + 0.5 * random.random()))
            delay = min(2 * delay, RETRY_MAX_S)
    raise AssertionError("unreachable")


class RetryingFS:
    """The calls this module makes on a ``pyarrow.fs`` filesystem, each whole (open, transfer, close) under
    :func:`retried`: a stream that breaks halfway is started again, and nothing is left half-written (one PUT
    becomes visible only when complete)."""

    def __init__(self, fs: "pafs.FileSystem", scheme: str) -> None:
        self.fs, self.scheme = fs, scheme

    def _uri(self, path: str) -> str:
        return f"{self.scheme}{path}"

    def info(self, path: str):
        return retried("stat", self._uri(path), lambda: self.fs.get_file_info(path))

    def listing(self, root: str, recursive: bool = True) -> list:
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(root, recursive=recursive, allow_not_found=True)
        return retried("list", self._uri(root), lambda: self.fs.get_file_info(selector))

    def read_bytes(self, path: str) -> bytes:
        import pyarrow.fs as pafs

        def read() -> bytes:
            if self.fs.get_file_info(path).type != pafs.FileType.File:
                raise FileNotFoundError(path)
            with self.fs.open_input_stream(path) as f:
                return f.read()
        return retried("read", self._uri(path), read)

    def download(self, path: str, local: Path) -> None:
        """``path`` into the local file ``local`` (through a temporary sibling)."""
        def copy() -> None:
            tmp = _tmp_sibling(local)
            try:
                with self.fs.open_input_stream(path) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 8 << 20)
                os.replace(tmp, local)
            finally:
                tmp.unlink(missing_ok=True)
        retried("download", self._uri(path), copy)

    def upload(self, local: Path, path: str) -> None:
        def put() -> None:
            with open(local, "rb") as src, self.fs.open_output_stream(path) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        retried("upload", self._uri(path), put)

    def write_bytes(self, path: str, data: bytes) -> None:
        def put() -> None:
            with self.fs.open_output_stream(path) as dst:
                dst.write(data)
        retried("write", self._uri(path), put)

    def delete(self, path: str) -> None:
        retried("delete", self._uri(path), lambda: self.fs.delete_file(path))

    def create_dir(self, path: str) -> None:
        retried("create", self._uri(path), lambda: self.fs.create_dir(path, recursive=True))


def _filesystem(uri: str) -> tuple[RetryingFS, str]:
    import pyarrow.fs as pafs

    fs, root = retried("open", uri, lambda: pafs.FileSystem.from_uri(uri))
    return RetryingFS(fs, uri[: uri.index("://") + 3] if "://" in uri else ""), root.rstrip("/")


def _read_remote(fs: RetryingFS, path: str) -> bytes:
    return fs.read_bytes(path)


def read_text(location: str | Path) -> str:
    """A file's text from a local path or a URI; FileNotFoundError when it is not there."""
    if not is_uri(location):
        return Path(location).read_text()
    fs, path = _filesystem(str(location))
    return _read_remote(fs, path).decode()


def _remote_files(fs: RetryingFS, root: str) -> dict[str, int]:
    """{relative path: size} of every object under ``root`` (empty when there is none)."""
    import pyarrow.fs as pafs

    infos = fs.listing(root)
    return {i.path[len(root) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def _is_scratch(rel: str) -> bool:
    # temporary siblings (.name.tmp-*) and lock files never leave the node
    return any(part.startswith(".") and (".tmp-" in part or part.endswith(".lock")) for part in rel.split("/"))


def _upload_file(fs: RetryingFS, local: Path, remote: str) -> None:
    # One PUT (multipart for large files) that becomes visible only when complete: no partial objects.
    fs.upload(local, remote)


def push(path: str | Path) -> None:
    """Upload a file (or a folder's files) written in a mirror to the bucket; no-op elsewhere."""
    path = Path(path)
    remote = remote_of(path)
    if remote is None or _is_scratch(path.as_posix()):
        return
    if path.is_dir():
        upload_tree(path)
    elif path.is_file():
        fs, target = _filesystem(remote)
        _upload_file(fs, path, target)


def upload_tree(folder: str | Path, uri: str | None = None, *, last: str = DONE_MARKER) -> None:
    """Upload every file under ``folder`` to ``uri`` (default: the folder's place in the bucket), the file
    named ``last`` (the completion marker) last; files already there with the same size are skipped.
    No-op for a local folder outside a mirror when no ``uri`` is given."""
    folder = Path(folder)
    uri = uri or remote_of(folder)
    if uri is None or not folder.is_dir():
        return
    fs, root = _filesystem(uri)
    there = _remote_files(fs, root)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    marker = folder / last
    for f in [p for p in files if p != marker] + ([marker] if marker.is_file() else []):
        rel = f.relative_to(folder).as_posix()
        if _is_scratch(rel) or rel == MIRROR_TAG or (f != marker and there.get(rel) == f.stat().st_size):
            continue
        _upload_file(fs, f, f"{root}/{rel}")


def _download(fs: RetryingFS, root: str, folder: Path) -> None:
    """Replace ``folder`` with a copy of the objects under ``root`` (to a temporary sibling, then renamed)."""
    files = _remote_files(fs, root)
    if not files:
        raise FileNotFoundError(f"nothing stored under {root}")
    with _swapped_in_dir(folder, overwrite=True) as tmp:
        for rel in sorted(files):
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            fs.download(f"{root}/{rel}", dst)


def fetch(path: str | Path) -> Path:
    """Make a mirrored file or folder present locally (from the bucket) if it is not; returns the path."""
    path = Path(path)
    remote = remote_of(path)
    if remote is None or path.exists():
        return path
    fs, target = _filesystem(remote)
    try:
        data = _read_remote(fs, target)
    except FileNotFoundError:
        with file_lock(path.with_name(f".{path.name}.lock")):
            if not path.exists():
                _download(fs, target, path)  # a folder; FileNotFoundError when there is none either
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def fetch_partial(folder: str | Path) -> None:
    """Download the files of a mirrored, unfinished folder that the bucket has and this node lacks (what
    an interrupted run left, to resume from); no-op elsewhere."""
    folder = Path(folder)
    remote = remote_of(folder)
    if remote is None:
        return
    fs, root = _filesystem(remote)
    for rel, size in _remote_files(fs, root).items():
        dst = folder / rel
        if _is_scratch(rel) or (dst.is_file() and dst.stat().st_size == size):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        fs.download(f"{root}/{rel}", dst)


def fetch_children(folder: str | Path) -> list[Path]:
    """The sub-folders of a mirrored folder as the bucket lists them (created locally, empty, so a
    caller can ask :func:`is_complete` of each); plain local sub-folders elsewhere."""
    import pyarrow.fs as pafs

    folder = Path(folder)
    remote = remote_of(folder)
    if remote is not None:
        fs, root = _filesystem(remote)
        for info in fs.listing(root, recursive=False):
            if info.type == pafs.FileType.Directory:
                (folder / info.base_name).mkdir(parents=True, exist_ok=True)
    return sorted(p for p in folder.glob("*") if p.is_dir()) if folder.is_dir() else []


def local_copy(location: str | Path) -> Path:
    """A local folder holding ``location``: a local path is returned as it is; a URI is fetched once per
    node into ``<cache>/fetched/<digest>/``, the digest hashing the URI and every object's name, size
    and modification time (what changes in the bucket is fetched again; concurrent callers fetch once)."""
    if not is_uri(location):
        return Path(location)
    import pyarrow.fs as pafs

    fs, root = _filesystem(str(location))
    infos = fs.listing(root)
    listing = sorted((i.path, i.size, i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File)
    if not listing:
        raise FileNotFoundError(f"{location}: no objects stored there")
    digest = hashlib.sha256(canonical_json([str(location), listing]).encode()).hexdigest()[:16]
    target = cache_root() / "fetched" / digest
    if (target / FETCHED_TAG).is_file():
        return target
    with file_lock(target.with_name(f".{target.name}.lock")):
        if not (target / FETCHED_TAG).is_file():  # another process of this node fetched it meanwhile
            _download(fs, root, target)
            atomic_write_json(target / FETCHED_TAG, {"uri": str(location), "objects": len(listing)})
    return target
