"""Pre-flight for `ray job submit`: the working directory Ray would upload, and the cluster address.

Ray zips the working directory (honouring .gitignore and .rayignore) into its GCS, which refuses
packages over its gRPC message limit; finding that out after a long upload wastes the user's time.
"""

from __future__ import annotations

import json
import shlex
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


class SubmitError(UserError, RuntimeError):
    pass


@dataclass
class UploadSize:
    bytes: int
    files: int
    largest: list[tuple[int, str]]


def upload_limit_bytes() -> int:
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return int(GCS_STORAGE_MAX_SIZE)


def working_dir_upload(path: str | Path, excludes: list[str] | None = None) -> UploadSize:
    """What Ray would upload for ``--working-dir path``, with Ray's own ignore-file rules."""
    # Ray's own traversal, so .gitignore/.rayignore (at every level) count exactly as in the upload
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(path).resolve()
    sizes: list[tuple[int, str]] = []

    def visit(p: Path) -> None:
        if p.is_file():
            sizes.append((p.stat().st_size, str(p.relative_to(root))))

    _dir_travel(root, [_get_excludes(root, excludes or [])], visit, include_gitignore=True)
    sizes.sort(reverse=True)
    return UploadSize(bytes=sum(s for s, _ in sizes), files=len(sizes), largest=sizes[:5])


def check_upload(path: str | Path, excludes: list[str] | None = None) -> UploadSize:
    size = working_dir_upload(path, excludes)
    limit = upload_limit_bytes()
    if size.bytes > limit:
        biggest = ", ".join(f"{name} ({s / 2**20:.1f} MiB)" for s, name in size.largest)
        raise SubmitError(
            f"working directory {path} would upload {size.bytes / 2**20:.1f} MiB in {size.files} files, over Ray's "
            f"{limit / 2**20:.0f} MiB limit. Largest: {biggest}. Add them to .rayignore or --runtime-env excludes, "
            "and keep data and models on shared storage instead."
        )
    return size


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """The Ray dashboard (job server) at ``address`` answers, or a clear error."""
    url = address if "://" in address else f"http://{address}"
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/api/version", timeout=timeout_s) as resp:  # noqa: S310
            json.loads(resp.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise SubmitError(
            f"no Ray job server answers at {address} ({e}). Start the cluster (`ray up cluster.yaml` or "
            "`ray start --head`), forward the dashboard port (`ray dashboard cluster.yaml`), or fix --address."
        ) from None


def submit_command(address: str, config: str, *, entry: str = "jobs/pipeline.py", overrides: list[str] = (),
                   working_dir: str = ".", extra: list[str] = ()) -> list[str]:
    """The `ray job submit` command line for ``config`` (what `forgetting-ray submit` runs)."""
    env = {"excludes": [".git", ".venv", "runs", ".cache"]}
    return ["ray", "job", "submit", "--address", address, "--working-dir", working_dir,
            "--runtime-env-json", json.dumps(env), "--", "python", entry, "--config", config, *overrides, *extra]


def format_command(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
