"""The environment the pipeline hands its Ray workers (forgetting_ray.cluster.session)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from forgetting_ray.cluster.session import (FOOTER_ACTORS_VAR, RAY_JOB_CONFIG_VAR, one_footer_actor, worker_env,
                                            working_in)


def test_worker_env_leaves_to_a_submitted_job_what_its_runtime_env_sets(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv(RAY_JOB_CONFIG_VAR, raising=False)
    assert worker_env()["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"  # a plain run forwards it

    # under `ray job submit --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": ...}}'` Ray refuses a driver
    # runtime env that sets the same key again; the job's value reaches the workers anyway
    job = {"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}, "working_dir": "gcs://x"}}
    monkeypatch.setenv(RAY_JOB_CONFIG_VAR, json.dumps(job))
    env = worker_env()
    assert "AWS_ENDPOINT_URL" not in env and env["DS_ACCELERATOR"] == "cpu"

    monkeypatch.setenv(RAY_JOB_CONFIG_VAR, "not json")  # unreadable: forward everything, as before
    assert "AWS_ENDPOINT_URL" in worker_env()


def test_parquet_reads_start_one_footer_actor_unless_the_user_says_otherwise(monkeypatch):
    monkeypatch.delenv(FOOTER_ACTORS_VAR, raising=False)
    with one_footer_actor():
        assert os.environ[FOOTER_ACTORS_VAR] == "1"
    assert FOOTER_ACTORS_VAR not in os.environ  # only while the Dataset is built
    monkeypatch.setenv(FOOTER_ACTORS_VAR, "8")
    with one_footer_actor():
        assert os.environ[FOOTER_ACTORS_VAR] == "8"
    assert os.environ[FOOTER_ACTORS_VAR] == "8"


def test_working_in_returns_to_a_cwd_that_ray_unpacked_again(tmp_path, monkeypatch):
    unpacked, search = tmp_path / "_ray_pkg_1", tmp_path / "search"
    unpacked.mkdir(), search.mkdir()
    monkeypatch.chdir(unpacked)
    with working_in(search):
        assert Path.cwd() == search
        shutil.rmtree(unpacked)  # another node sharing the temp dir sets up the same runtime env
        unpacked.mkdir()
        assert os.path.relpath("bucket/runs/x", start="bucket/runs") == "x"  # Tune's call, cwd intact
    assert Path.cwd() == unpacked and os.getcwd()

    with working_in(search):
        shutil.rmtree(unpacked)  # and gone for good: the search folder stays the cwd
    assert Path.cwd() == search


def test_working_in_starts_from_a_cwd_ray_replaced_before_the_block(tmp_path, monkeypatch):
    unpacked, search = tmp_path / "_ray_pkg_1", tmp_path / "search"
    unpacked.mkdir(), search.mkdir()
    monkeypatch.chdir(unpacked)
    monkeypatch.setenv("PWD", str(unpacked))  # what `cd DIR && python ...` leaves the job
    shutil.rmtree(unpacked)  # a node added during the job's first stages unpacked the working_dir again
    unpacked.mkdir()
    with pytest.raises(FileNotFoundError):
        os.getcwd()
    with working_in(search):
        assert Path.cwd() == search
    assert Path.cwd() == unpacked and os.getcwd()
