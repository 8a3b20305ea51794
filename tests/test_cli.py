"""The `forgetting-ray` command line: argument handling and user-facing errors (no cluster)."""

from __future__ import annotations

import os

import pytest

from forgetting_ray.cli import build_parser, main


def test_overrides_may_follow_options(capsys):
    assert main(["config", "examples/demo.yaml", "data.max_length=99", "--reference"]) == 0
    assert "| `data.max_length` |" in capsys.readouterr().out  # --reference printed the field table
    assert main(["config", "examples/demo.yaml", "--reference", "data.max_length=99"]) == 0
    capsys.readouterr()
    assert main(["config", "examples/demo.yaml", "data.max_length=99"]) == 0
    assert "max_length: 99" in capsys.readouterr().out


def test_unknown_flag_is_rejected():
    with pytest.raises(SystemExit) as e:
        main(["config", "examples/demo.yaml", "--no-such-flag"])
    assert e.value.code == 2


def test_bad_config_prints_one_error_line_naming_file_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  lr: -1\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.yaml" in err and "training.lr" in err
    assert "Traceback" not in err


def test_missing_input_file_is_a_user_error_not_a_traceback(tmp_path, capsys):
    rc = main(["prepare", "examples/demo.yaml", f"run_dir={tmp_path}", "tracking.enabled=false",
               f"data.train_files=[{tmp_path}/missing.jsonl]"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.jsonl" in err and "Traceback" not in err


def test_plan_command_prints_the_memory_table(capsys):
    assert main(["plan", "llama-3.1-8b", "--gpus-per-node", "4", "--gpu-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "Llama" in out or "llama" in out
    assert "*" in out  # the chosen setting is marked
    assert main(["plan", "llama-3.1-8b", "--zero-stage", "2", "--offload", "params"]) == 2
    assert "ZeRO-3" in capsys.readouterr().err


def test_every_stage_has_a_sub_command():
    names = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"run", "prepare", "reference", "score", "partition", "train", "eval", "tune", "doctor", "report", "reproduce",
            "plan", "submit", "config"} <= names


def test_missing_benchmark_file_fails_before_any_stage(tmp_path, capsys):
    rc = main(["run", "examples/demo.yaml", f"run_dir={tmp_path}/run", f"eval.data_dir={tmp_path}/no-eval"])
    err = capsys.readouterr().err
    assert rc == 2 and "benchmark file not found" in err and "no-eval" in err
    assert not (tmp_path / "run" / "prepare").exists()  # nothing was computed


def test_wrong_type_override_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    rc = main(["prepare", "examples/demo.yaml", f"run_dir={tmp_path}/run", "training.lr=abc", "training.max_steps=1.5"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "training.lr: " in err and "(got 'abc')" in err and "training.max_steps: " in err and "(got 1.5)" in err
    assert not (tmp_path / "run").exists()


def test_run_dir_that_is_a_file_is_one_clear_error(tmp_path, capsys):
    in_the_way = tmp_path / "run"
    in_the_way.write_text("not a folder")
    rc = main(["prepare", "examples/demo.yaml", f"run_dir={in_the_way}", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: run_dir {in_the_way} is not writable") and err.count("\n") == 1
    assert "set run_dir" in err and in_the_way.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through folder permissions; "
                    "test_run_dir_that_is_a_file_is_one_clear_error covers the same error path")
def test_run_dir_without_write_permission_is_one_clear_error(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc = main(["prepare", "examples/demo.yaml", f"run_dir={locked}/run", "tracking.enabled=false"])
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: run_dir {locked}/run is not writable") and "Permission denied" in err
    assert list(locked.iterdir()) == []
