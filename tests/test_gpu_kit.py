"""bench/gpu_kit.py's pieces that would fail only on the offline GPU machine: a wheel repacked without a folder
(Ray without ray/jars) must keep a true RECORD and still install; the parts must join back to the archive, and a
missing or corrupt part must be named before anything is extracted.  The build and the offline install themselves:
`make gpu-kit-rehearsal` (bench/README.md)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_kit", REPO / "bench" / "gpu_kit.py")
kit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kit)


def _row(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}\n"


def synthetic_wheel(folder: Path) -> Path:
    """A wheel shaped like Ray's: a package, a folder of jars inside it, a dist-info whose RECORD lists them all."""
    files = {
        "slimpkg/__init__.py": b"VALUE = 42\n",
        "slimpkg/jars/worker.jar": os.urandom(4096),
        "slimpkg/jars/deps/extra.jar": os.urandom(2048),
        "slimpkg/core.py": b"def answer():\n    return 42\n",
        "slimpkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: slimpkg\nVersion: 1.0\n",
        "slimpkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    path = folder / "slimpkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("slimpkg-1.0.dist-info/RECORD",
                    "".join(_row(n, d) for n, d in files.items()) + "slimpkg-1.0.dist-info/RECORD,,\n")
    return path


def test_repacked_wheel_keeps_a_true_record_and_installs(tmp_path):
    wheel = synthetic_wheel(tmp_path)
    assert kit.record_problems(wheel) == []
    slim_dir = tmp_path / "slim"
    slim_dir.mkdir()
    slim = kit.repack_without(wheel, "slimpkg/jars", slim_dir / wheel.name)

    assert kit.record_problems(slim) == []
    with zipfile.ZipFile(slim) as zf:
        names = zf.namelist()
        record = zf.read("slimpkg-1.0.dist-info/RECORD").decode()
    assert not [n for n in names if "jars" in n] and "jars" not in record
    assert names[-1] == "slimpkg-1.0.dist-info/RECORD"  # last, as the wheel spec asks
    assert {"slimpkg/__init__.py", "slimpkg/core.py"} <= set(names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--isolated",
                    "--target", str(site), str(slim)], check=True)
    assert not (site / "slimpkg" / "jars").exists()
    out = subprocess.run([sys.executable, "-c", "import slimpkg.core as c; print(c.answer())"],
                         env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "42"


def test_record_problems_names_what_a_naive_repack_leaves_behind(tmp_path):
    wheel = synthetic_wheel(tmp_path)
    stale = tmp_path / "stale.whl"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(stale, "w") as dst:
        for info in src.infolist():
            if not info.filename.startswith("slimpkg/jars/"):
                data = src.read(info)
                dst.writestr(info, data.replace(b"42", b"43") if info.filename.endswith("core.py") else data)
    problems = kit.record_problems(stale)
    assert "slimpkg/jars/worker.jar: in RECORD, not in the wheel" in problems
    assert "slimpkg/core.py: hash or size differs from RECORD" in problems


def _kit(tmp_path: Path, part_bytes: int) -> tuple[Path, Path, list[dict]]:
    """A kit folder as `build` writes it, of a tar holding one small wheel, split into tiny parts."""
    wheel = synthetic_wheel(tmp_path)
    archive = tmp_path / "gpu-kit-test.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(wheel, arcname=f"wheelhouse/{wheel.name}")
    kit_dir = tmp_path / "kit"
    kit_dir.mkdir()
    parts = kit.split(archive, kit_dir, part_bytes)
    kit.write_manifest(kit_dir, archive, parts, [wheel], f"{sys.version_info.major}.{sys.version_info.minor}")
    return kit_dir, archive, parts


def test_split_parts_join_back_and_unpack(tmp_path):
    kit_dir, archive, parts = _kit(tmp_path, part_bytes=4096)
    assert len(parts) >= 3 and all(p["bytes"] <= 4096 for p in parts)
    joined = kit.join(kit_dir, tmp_path / "joined.tar")
    assert joined.read_bytes() == archive.read_bytes()

    wheelhouse = kit.unpack(kit_dir)
    assert [w.name for w in wheelhouse.glob("*.whl")] == ["slimpkg-1.0-py3-none-any.whl"]
    assert not (kit_dir / "kit.tar").exists()  # the joined archive is not left beside the parts


def test_join_names_a_missing_or_corrupt_part(tmp_path):
    kit_dir, _, parts = _kit(tmp_path, part_bytes=4096)
    second, third = kit_dir / parts[1]["name"], kit_dir / parts[2]["name"]

    data = bytearray(second.read_bytes())
    data[100] ^= 0xFF  # same size, one bit pattern off: only the sha256 tells
    second.write_bytes(bytes(data))
    with pytest.raises(kit.KitError, match=rf"corrupt part\(s\).*{parts[1]['name']}") as err:
        kit.join(kit_dir, tmp_path / "joined.tar")
    assert parts[0]["name"] not in str(err.value)

    third.unlink()
    with pytest.raises(kit.KitError, match=rf"missing part\(s\).*{parts[2]['name']}"):
        kit.join(kit_dir, tmp_path / "joined.tar")

    (kit_dir / "manifest.json").unlink()
    with pytest.raises(kit.KitError, match="manifest.json is missing"):
        kit.join(kit_dir, tmp_path / "joined.tar")


def test_unpack_refuses_a_kit_for_another_python(tmp_path):
    kit_dir, _, _ = _kit(tmp_path, part_bytes=4096)
    manifest = (kit_dir / "manifest.json").read_text()
    here = f'"python": "{sys.version_info.major}.{sys.version_info.minor}"'
    (kit_dir / "manifest.json").write_text(manifest.replace(here, '"python": "2.7"'))
    with pytest.raises(kit.KitError, match=r"for Python 2\.7.*make gpu-kit PY="):
        kit.unpack(kit_dir)


def test_cli_reports_a_broken_kit_without_a_traceback(tmp_path):
    kit_dir, _, parts = _kit(tmp_path, part_bytes=4096)
    (kit_dir / parts[0]["name"]).unlink()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_kit.py"), "unpack", "--kit", str(kit_dir)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"missing part(s) in {kit_dir}: {parts[0]['name']}" in proc.stderr
