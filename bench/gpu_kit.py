"""Offline GPU kit: the wheels an offline GPU machine lacks to run bench/gpu_check.py, split into parts <= 60 MiB.

The machine is assumed to hold Python with torch (CUDA), transformers, peft, accelerate and pyarrow; the kit
brings everything else forgetting-ray needs (Ray without its Java jars, DeepSpeed as a pure-Python wheel, MLflow,
datasets, their dependencies) and forgetting-ray itself, each at the version the test suite runs (the .venv).

    python bench/gpu_kit.py build --python 3.11   # here: .gpu-kit/ parts + manifest.json   (make gpu-kit PY=3.11)
    python bench/gpu_kit.py unpack                # there: join, verify, extract .gpu-kit/wheelhouse (gpu_bootstrap.sh)
    python bench/gpu_kit.py rehearse              # here: a venv holding only what the machine holds, then the
                                                  # bootstrap with --cpu-rehearsal   (make gpu-kit-rehearsal)

`unpack` runs on the GPU machine before anything is installed there: this module imports the standard library only.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]
KIT_DIR = REPO / ".gpu-kit"
SCRATCH = Path("/tmp/gpu-kit-build")
PART_BYTES = 60 * 2**20  # the machine takes transfers of at most 64 MiB
TORCH_WHEEL = Path("/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
# What the GPU machine holds besides torch; the kit leaves them and their dependencies out.
HELD = ("transformers", "peft", "accelerate", "pyarrow")
# pip widens each manylinux tag to every older glibc, so these two cover manylinux1 .. 2.28.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64")
# Ray's Java workers: 30.7 of its wheel's 75.1 MiB, never started by forgetting-ray.
RAY_UNUSED_FOLDER = "ray/jars"
# gpu_check's CPU rehearsal as tests/integration/test_gpu_check.py runs it: 4 steps, a stand-in peak.
REHEARSAL_ARGS = ("--cpu-rehearsal", "--steps", "4", "--samples", "120", "--peak-tflops", "0.05")


class KitError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def python_tag(version: str) -> str:
    major, minor = version.split(".")[:2]
    return f"cp{major}{minor}"


# --- wheels: drop a folder, keep RECORD true ---------------------------------------------------------------------

def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _record_name(zf: zipfile.ZipFile) -> str:
    names = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
    if len(names) != 1:
        raise KitError(f"{zf.filename}: expected one top-level *.dist-info/RECORD, found {names}")
    return names[0]


def record_problems(wheel: Path) -> list[str]:
    """What pip or `wheel` would object to: members missing from RECORD, RECORD rows without a member, bad hashes."""
    problems = []
    with zipfile.ZipFile(wheel) as zf:
        record = _record_name(zf)
        rows = {row[0]: row for row in csv.reader(io.StringIO(zf.read(record).decode())) if row}
        members = [n for n in zf.namelist() if not n.endswith("/")]
        for name in members:
            row = rows.pop(name, None)
            if row is None:
                problems.append(f"{name}: not in RECORD")
            elif name != record:
                data = zf.read(name)
                if row[1] != _record_hash(data) or (row[2] and int(row[2]) != len(data)):
                    problems.append(f"{name}: hash or size differs from RECORD")
        problems += [f"{name}: in RECORD, not in the wheel" for name in rows]
    return problems


def repack_without(wheel: Path, folder: str, out: Path) -> Path:
    """``wheel`` rewritten to ``out`` without ``folder``'s files and their RECORD rows (RECORD still last)."""
    prefix = folder.rstrip("/") + "/"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        record = _record_name(src)
        for info in src.infolist():
            if info.filename.startswith(prefix) or info.filename == record:
                continue
            dst.writestr(info, src.read(info), compress_type=info.compress_type)
        rows = [row for row in csv.reader(io.StringIO(src.read(record).decode())) if row and not row[0].startswith(prefix)]
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        dst.writestr(src.getinfo(record), text.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    problems = record_problems(out)
    if problems:
        raise KitError(f"{out.name} after removing {folder}: " + "; ".join(problems[:5]))
    return out


# --- parts: split, manifest, join ------------------------------------------------------------------------------------

def split(archive: Path, out_dir: Path, part_bytes: int = PART_BYTES) -> list[dict]:
    parts = []
    with open(archive, "rb") as f:
        while True:
            chunk = f.read(part_bytes)
            if not chunk:
                break
            path = out_dir / f"{archive.name}.{len(parts):02d}"
            path.write_bytes(chunk)
            parts.append({"name": path.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    return parts


def write_manifest(out_dir: Path, archive: Path, parts: list[dict], wheels: list[Path], python: str) -> Path:
    manifest = {
        "python": python, "python_tag": python_tag(python), "platforms": list(PLATFORMS),
        "archive": {"name": archive.name, "bytes": archive.stat().st_size, "sha256": sha256_file(archive)},
        "parts": parts,
        "wheels": [{"name": w.name, "bytes": w.stat().st_size, "sha256": sha256_file(w)} for w in sorted(wheels)],
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def join(kit_dir: Path, dest: Path) -> Path:
    """The parts of ``kit_dir``'s manifest joined into ``dest``; every part and the whole checked against it."""
    manifest_path = kit_dir / "manifest.json"
    if not manifest_path.is_file():
        raise KitError(f"{manifest_path} is missing: copy the whole .gpu-kit/ folder that `make gpu-kit` wrote")
    manifest = json.loads(manifest_path.read_text())
    missing = [p["name"] for p in manifest["parts"] if not (kit_dir / p["name"]).is_file()]
    if missing:
        raise KitError(f"missing part(s) in {kit_dir}: {', '.join(missing)}")
    corrupt = [p["name"] for p in manifest["parts"]
               if (kit_dir / p["name"]).stat().st_size != p["bytes"] or sha256_file(kit_dir / p["name"]) != p["sha256"]]
    if corrupt:
        raise KitError(f"corrupt part(s) in {kit_dir} (size or sha256 differs from manifest.json): {', '.join(corrupt)}"
                       "; copy them again")
    h = hashlib.sha256()
    with open(dest, "wb") as out:
        for p in manifest["parts"]:
            data = (kit_dir / p["name"]).read_bytes()
            h.update(data)
            out.write(data)
    if h.hexdigest() != manifest["archive"]["sha256"]:
        raise KitError(f"the joined {manifest['archive']['name']} does not match manifest.json's sha256 "
                       "although every part does: the manifest belongs to another build")
    return dest


def unpack(kit_dir: Path) -> Path:
    """Joins, verifies and extracts the kit into ``kit_dir``/wheelhouse, refusing a kit built for another Python."""
    manifest = json.loads((kit_dir / "manifest.json").read_text()) if (kit_dir / "manifest.json").is_file() else {}
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest and manifest["python"] != here:
        raise KitError(f"the kit in {kit_dir} is for Python {manifest['python']}, this is {here} ({sys.executable}): "
                       f"build it with `make gpu-kit PY={here}`")
    archive = join(kit_dir, kit_dir / "kit.tar")
    wheelhouse = kit_dir / "wheelhouse"
    shutil.rmtree(wheelhouse, ignore_errors=True)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(kit_dir, filter="data")
        else:
            tar.extractall(kit_dir)
    archive.unlink()
    wheels = sorted(w.name for w in wheelhouse.glob("*.whl"))
    if wheels != sorted(w["name"] for w in manifest["wheels"]):
        raise KitError(f"{wheelhouse} does not hold the wheels manifest.json lists")
    return wheelhouse


# --- build (on a machine with PyPI) ----------------------------------------------------------------------------------

def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def pip(*args, python: Path | None = None) -> list:
    """pip of this interpreter (the project's .venv), acting on ``python``'s environment when given."""
    return [sys.executable, "-m", "pip", *(["--python", python] if python else []), *args]


def tested_pins(path: Path) -> Path:
    """The versions the test suite runs (this .venv), as constraints: the kit ships those, not PyPI's newest."""
    frozen = subprocess.run(pip("freeze", "--exclude-editable"), check=True, capture_output=True, text=True).stdout
    keep = [line for line in frozen.splitlines()
            if "==" in line and " @ " not in line and not line.lower().startswith(("torch==", "forgetting-ray=="))]
    path.write_text("\n".join(keep) + "\n")
    return path


def source_copy(dest: Path) -> Path:
    """The working tree as git sees it (tracked and untracked-but-not-ignored files), so no build output leaks in."""
    shutil.rmtree(dest, ignore_errors=True)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def build_project_wheel(local: Path, scratch: Path) -> Path:
    for old in local.glob("forgetting_ray-*.whl"):
        old.unlink()
    src = source_copy(scratch / "src")
    run(pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", local, src))
    return next(local.glob("forgetting_ray-*.whl"))


def build_deepspeed_wheel(version: str, local: Path, scratch: Path) -> Path:
    """PyPI has DeepSpeed as an sdist only; built here against this .venv's torch, with no C++/CUDA ops compiled
    (DS_BUILD_OPS=0: forgetting-ray passes torch's AdamW, and DeepSpeed picks the accelerator at run time)."""
    built = list(local.glob(f"deepspeed-{version}-*.whl"))
    if built:
        return built[0]
    sdists = scratch / "sdist"
    run(pip("download", "--quiet", "--no-deps", "--no-binary=:all:", "-d", sdists, f"deepspeed=={version}"))
    sdist = next(sdists.glob(f"deepspeed-{version}.tar.gz"))
    run(pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", local, sdist),
        env={**os.environ, "DS_BUILD_OPS": "0"})
    return next(local.glob(f"deepspeed-{version}-*.whl"))


def machine_venv(path: Path, torch_wheel: Path, pins: Path, python: str | None = None) -> Path:
    """A venv holding only what the GPU machine holds: torch (the CPU wheel) and HELD at the tested versions."""
    from importlib.metadata import version

    held = [str(torch_wheel)] + [f"{name}=={version(name)}" for name in HELD]
    stamp = path / ".held"
    wanted = "\n".join(held + [pins.read_text()])
    if stamp.is_file() and stamp.read_text() == wanted:
        return path / "bin" / "python"
    shutil.rmtree(path, ignore_errors=True)
    base = python or getattr(sys, "_base_executable", sys.executable)
    run([base, "-m", "venv", path])
    run(pip("install", "--quiet", *held, "-c", REPO / "constraints.txt", "-c", pins, python=path / "bin" / "python"))
    stamp.write_text(wanted)
    return path / "bin" / "python"


def resolve(machine_python: Path, python: str, project: Path, local: Path, pins: Path, report: Path) -> list[dict]:
    """What `pip install forgetting-ray` would add to the machine's environment, as wheels for ``python``'s tag.

    pip evaluates environment markers with the interpreter it runs on (the machine venv's), so for a ``python``
    other than that one a dependency gated by a python_version marker could be missed: the bootstrap's
    --no-index install would then stop and name it."""
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    run(pip("install", "--dry-run", "--quiet", "--report", report, "--only-binary=:all:",
            "--python-version", python, "--implementation", "cp", *platforms,
            "--find-links", local, "-c", REPO / "constraints.txt", "-c", pins, project, python=machine_python))
    return json.loads(report.read_text())["install"]


def fetch(items: list[dict], python: str, wheelhouse: Path) -> list[Path]:
    """The resolved wheels into ``wheelhouse``: local ones copied, the rest downloaded, each checked against the
    resolution's sha256."""
    shutil.rmtree(wheelhouse, ignore_errors=True)
    wheelhouse.mkdir(parents=True)
    remote = []
    for item in items:
        url = item["download_info"]["url"]
        if url.startswith("file://"):
            shutil.copy2(url[len("file://"):], wheelhouse)
        else:
            remote.append(f"{item['metadata']['name']}=={item['metadata']['version']}")
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    if remote:
        run(pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", python,
                "--implementation", "cp", *platforms, "-d", wheelhouse, *remote))
    wheels = {w.name: w for w in wheelhouse.glob("*.whl")}
    for item in items:
        name = unquote(item["download_info"]["url"].rsplit("/", 1)[-1].split("#")[0])
        if name not in wheels:
            raise KitError(f"{name} was resolved but not fetched")
        want = item["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256")
        if want and sha256_file(wheels[name]) != want:
            raise KitError(f"{name}: sha256 differs from the resolution's")
    if len(wheels) != len(items):
        raise KitError(f"fetched {sorted(wheels)}, resolved {len(items)} items")
    return sorted(wheels.values())


def build(python: str, kit_dir: Path, scratch: Path, torch_wheel: Path) -> dict:
    from importlib.metadata import version

    t0 = time.perf_counter()
    scratch.mkdir(parents=True, exist_ok=True)
    local = scratch / "local"
    local.mkdir(exist_ok=True)
    pins = tested_pins(scratch / "tested.txt")
    project = build_project_wheel(local, scratch)
    build_deepspeed_wheel(version("deepspeed"), local, scratch)
    machine = machine_venv(scratch / "machine-venv", torch_wheel, pins)
    items = resolve(machine, python, project, local, pins, scratch / "resolution.json")
    wheelhouse = scratch / "wheelhouse"
    wheels = fetch(items, python, wheelhouse)
    for ray in [w for w in wheels if w.name.startswith("ray-")]:
        slim = repack_without(ray, RAY_UNUSED_FOLDER, scratch / ray.name)
        shutil.move(slim, ray)
    archive = scratch / f"gpu-kit-{python_tag(python)}.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for w in wheels:
            tar.add(w, arcname=f"wheelhouse/{w.name}")
    kit_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*kit_dir.glob("gpu-kit-*.tar.*"), kit_dir / "manifest.json", kit_dir / "kit.tar"]:
        stale.unlink(missing_ok=True)  # a part left from a bigger kit would be moved along for nothing
    shutil.rmtree(kit_dir / "wheelhouse", ignore_errors=True)
    parts = split(archive, kit_dir)
    write_manifest(kit_dir, archive, parts, wheels, python)
    summary = {"python": python, "wheels": len(wheels), "archive_mib": archive.stat().st_size / 2**20,
               "parts_mib": [p["bytes"] / 2**20 for p in parts], "seconds": time.perf_counter() - t0}
    print(f"gpu_kit: {len(wheels)} wheels, {summary['archive_mib']:.1f} MiB in {len(parts)} part(s) "
          f"({', '.join(f'{m:.1f}' for m in summary['parts_mib'])} MiB) in {kit_dir} "
          f"[{summary['seconds']:.0f} s]")
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    return summary


# --- rehearsal (here): the machine, offline, then the bootstrap ------------------------------------------------------

def rehearse(kit_dir: Path, scratch: Path, torch_wheel: Path, gpu_check_args: list[str]) -> int:
    """A fresh venv holding only what the GPU machine holds, a copy of the repository with the kit's parts, then
    bench/gpu_bootstrap.sh there with pip cut off from every index."""
    manifest = json.loads((kit_dir / "manifest.json").read_text())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"] != here:
        raise KitError(f"the kit is for Python {manifest['python']}; the rehearsal runs on {here}")
    root = scratch / "rehearsal"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    pins = tested_pins(root / "tested.txt")
    t0 = time.perf_counter()
    machine = machine_venv(root / "machine", torch_wheel, pins)
    print(f"gpu_kit: the machine's venv in {time.perf_counter() - t0:.0f} s", flush=True)
    repo = source_copy(root / "repo")
    shutil.copytree(kit_dir, repo / ".gpu-kit", ignore=shutil.ignore_patterns("wheelhouse", "*.tar"))
    offline = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "RAY_ADDRESS"))}
    offline.update({
        "PATH": f"{machine.parent}{os.pathsep}{os.environ['PATH']}",
        "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull,  # no index, no find-links from this machine's pip.conf
        "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "TORCH_EXTENSIONS_DIR": str(root / "torch_extensions"),
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    })
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "bench/gpu_bootstrap.sh", *gpu_check_args, "--run-dir", str(root / "run"),
                           "--json", str(root / "figures.json")], cwd=repo, env=offline, check=False)
    print(f"gpu_kit: rehearsal {'passed' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}: "
          f"bootstrap + gpu_check in {time.perf_counter() - t0:.0f} s", flush=True)
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="the kit for a GPU machine's Python into --kit")
    b.add_argument("--python", default="3.11", help="the GPU machine's `python -V`, major.minor (default 3.11)")
    u = sub.add_parser("unpack", help="join, verify and extract the kit (on the GPU machine)")
    r = sub.add_parser("rehearse", help="install the kit offline into a venv like the machine's, run gpu_check "
                                        f"{' '.join(REHEARSAL_ARGS)}")
    for s in (b, u, r):
        s.add_argument("--kit", type=Path, default=KIT_DIR, help=f"the kit's folder (default {KIT_DIR})")
    for s in (b, r):
        s.add_argument("--scratch", type=Path, default=SCRATCH, help=f"build scratch (default {SCRATCH})")
        s.add_argument("--torch-wheel", type=Path, default=TORCH_WHEEL, help="the CPU torch wheel standing in for the machine's")
    args = p.parse_args(argv)
    try:
        if args.command == "build":
            build(args.python, args.kit, args.scratch, args.torch_wheel)
        elif args.command == "unpack":
            print(f"gpu_kit: wheels in {unpack(args.kit)}")
        else:
            return rehearse(args.kit, args.scratch, args.torch_wheel, list(REHEARSAL_ARGS))
    except KitError as e:
        print(f"gpu_kit: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
