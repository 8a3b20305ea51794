"""Session fixtures of the integration tests: one local Ray cluster (2 CPUs), and one tiny pipeline run in a
fresh clone whose run folder the tests of the console, the stage outputs, the audit report, `reproduce` and
the MLflow UI all read (tests/README.md: what each expensive thing costs and who shares it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import FAST_TRAIN_POLL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_cluster():
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
    from forgetting_ray.cluster.session import init_ray

    ray = init_ray(num_cpus=2, include_dashboard=True)
    yield ray
    ray.shutdown()


def repository_files() -> list[str]:
    """What `git clone` would hold: tracked files, plus files not yet committed that git does not ignore."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (Path(REPO) / f).is_file()]


@dataclass(frozen=True)
class CloneRun:
    """The tiny pipeline run by the installed package of a fresh clone, as a user runs it."""

    clone: Path  # the copy of the repository, alone in its parent folder
    site: Path  # where the clone's wheel is installed
    env: dict[str, str]  # the environment every command of the clone runs with
    run_dir: Path
    stdout: str
    stderr: str

    def cli(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """`forgetting-ray ARGS` from the clone's folder, with the installed package (``-P``: the working
        directory is not put on sys.path, so the clone's source cannot stand in for the install)."""
        return subprocess.run([sys.executable, "-P", "-m", "forgetting_ray.cli", *args], cwd=self.clone, env=self.env,
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def clone_run(tmp_path_factory) -> CloneRun:
    """Copy the repository into an empty folder, install it from a wheel built there (offline, no
    dependencies: they come from this session's virtualenv, so nothing is resolved again), and run the tiny
    pipeline through evaluation on the benchmark files the wheel ships. Its own local Ray cluster, since a
    user's run starts one; tests that change the run folder work on a copy of it."""
    root = tmp_path_factory.mktemp("clone")
    clone = root / "fresh" / "forgetting-ray"
    for rel in repository_files():
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(REPO) / rel, clone / rel)
    site = root / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                              "--no-build-isolation", "--target", str(site), str(clone)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, (install.stdout + install.stderr)[-4000:]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true", TOKENIZERS_PARALLELISM="false",
               **FAST_TRAIN_POLL)
    run_dir = clone / "runs" / "tiny"
    run = CloneRun(clone, site, env, run_dir, "", "")
    proc = run.cli("run", "examples/demo.yaml", "--tiny", f"run_dir={run_dir}", "reference.max_steps=3",
                   "training.max_steps=3", "baselines=[]", "eval_base_model=false", "eval.limit=3",
                   "tracking.register_as=forgetting-tiny")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return CloneRun(clone, site, env, run_dir, proc.stdout, proc.stderr)
