import os
import subprocess
import sys

import pytest

from forgetting_ray.submit import SubmitError, check_address, check_upload, submit_command, working_dir_upload

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_repo_upload_is_small_and_skips_ignored_paths():
    size = working_dir_upload(REPO, [".git"])
    names = [n for _, n in size.largest]
    assert size.bytes < 20 * 2**20, names
    assert not any(n.startswith((".venv", "runs/", ".cache/")) for n in names)


def test_oversized_working_dir_fails_before_submitting(tmp_path):
    big = tmp_path / "weights.safetensors.part"
    with open(big, "wb") as fh:  # sparse: costs no disk
        fh.truncate(600 * 2**20)
    with pytest.raises(SubmitError, match="over Ray's 512 MiB limit.*weights.safetensors.part"):
        check_upload(tmp_path)
    (tmp_path / ".rayignore").write_text("*.part\n")
    assert check_upload(tmp_path).bytes < 2**20


def test_unreachable_address_is_a_clear_error():
    with pytest.raises(SubmitError, match="no Ray job server answers at 127.0.0.1:9"):
        check_address("127.0.0.1:9", timeout_s=2)


def test_cli_submit_refuses_unreachable_cluster():
    r = subprocess.run([sys.executable, "-m", "forgetting_ray.cli", "submit", "examples/demo.yaml", "--address",
                        "http://127.0.0.1:9"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no Ray job server answers" in r.stderr


def test_submit_command_shape():
    cmd = submit_command("http://127.0.0.1:8265", "jobs/configs/x.yaml", overrides=["training.lr=1e-5"])
    assert cmd[:3] == ["ray", "job", "submit"] and cmd[cmd.index("--") + 1 :][:2] == ["python", "jobs/pipeline.py"]
