"""Object storage that fails now and then, or for good (a fault proxy in front of moto): the product's own
bucket I/O retries transient faults with backoff and ends with the same objects as without faults; a
persistent fault stops with one error naming the operation and the object, and no stage is marked complete
without all its files."""

from __future__ import annotations

import hashlib

import pytest

from forgetting_ray import store
from forgetting_ray.cli import main
from forgetting_ray.errors import UserError
from forgetting_ray.store import DONE_MARKER, StorageError, is_complete, local_copy, mark_complete, run_root, tree_sha256

from faultproxy import FaultProxy


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(store, "RETRY_BASE_S", 0.01)
    monkeypatch.setattr(store, "RETRY_MAX_S", 0.05)


def _objects(s3, bucket: str, prefix: str, run_dir: str = "") -> dict[str, str]:
    """sha256 of every object under ``prefix``, by its key below it; ``run_dir`` (named in a manifest) as RUN."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            if not o["Key"].endswith("/"):
                body = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                if run_dir:
                    body = body.replace(run_dir.encode(), b"RUN")
                out[o["Key"][len(prefix):]] = hashlib.sha256(body).hexdigest()
    return out


def _stage_folder(run_dir: str, files: int = 12):
    folder = run_root(run_dir) / "score" / "k1"
    folder.mkdir(parents=True)
    for i in range(files):
        (folder / f"shard-{i:03d}.parquet").write_bytes(hashlib.sha256(str(i).encode()).digest() * (200 + 300 * i))
    return folder


def test_transient_faults_are_retried_and_the_bucket_ends_identical(bucket, s3_endpoint, monkeypatch, tmp_path,
                                                                     quick_retries):
    name, s3 = bucket
    monkeypatch.setenv("FORGETTING_RAY_CACHE", str(tmp_path / "node-a"))
    clean = _stage_folder(f"s3://{name}/clean")
    mark_complete(clean, {"rows": 12})
    with FaultProxy(s3_endpoint, fault_rate=0.2, seed=7) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        faulty = _stage_folder(f"s3://{name}/faulty")
        mark_complete(faulty, {"rows": 12})
        # another node: a fresh cache fetches the finished stage back through the same faults
        monkeypatch.setenv("FORGETTING_RAY_CACHE", str(tmp_path / "node-b"))
        fetched = run_root(f"s3://{name}/faulty") / "score" / "k1"
        assert is_complete(fetched)
        copy = local_copy(f"s3://{name}/faulty/score/k1")
    faults = proxy.counts["503"] + proxy.counts["reset"]
    assert faults >= 5, proxy.counts  # the faults happened, and were ridden out
    assert _objects(s3, name, "faulty/") == _objects(s3, name, "clean/")
    assert tree_sha256(fetched) == tree_sha256(clean)  # the stage folder, marker included
    assert tree_sha256(copy, "shard-*") == tree_sha256(clean, "shard-*")  # (a fetched copy adds its own tag)


def test_a_persistent_fault_names_the_object_and_leaves_the_stage_unmarked(bucket, s3_endpoint, monkeypatch,
                                                                            tmp_path, quick_retries):
    name, s3 = bucket
    monkeypatch.setenv("FORGETTING_RAY_CACHE", str(tmp_path / "node-a"))
    monkeypatch.setattr(store, "RETRY_ATTEMPTS", 3)  # each try also waits out pyarrow's own AWS retries
    with FaultProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        folder = _stage_folder(f"s3://{name}/broken")
        proxy.always_fail.append("shard-005")
        with pytest.raises(StorageError) as err:
            mark_complete(folder, {"rows": 12})
    assert isinstance(err.value, UserError)
    assert str(err.value).startswith(f"object storage: upload s3://{name}/broken/score/k1/shard-005.parquet failed after")
    keys = _objects(s3, name, "broken/")
    assert "score/k1/shard-005.parquet" not in keys and f"score/k1/{DONE_MARKER}" not in keys
    assert not (folder / DONE_MARKER).exists()  # not done here either
    assert proxy.counts["persistent"] >= 3  # every try reached the store


def test_the_prepare_stage_through_faults_writes_what_it_writes_without(bucket, s3_endpoint, monkeypatch, tmp_path,
                                                                         quick_retries, capsys):
    """A whole stage (the lock, the pre-flight probe, the token tables, the manifest, the marker) into a bucket
    with one request in five failing: the same objects as into a bucket without faults."""
    name, s3 = bucket
    args = ["prepare", "examples/demo.yaml", "--tiny", "tracking.enabled=false", "data.max_samples=64"]
    monkeypatch.setenv("FORGETTING_RAY_CACHE", str(tmp_path / "node-a"))
    assert main([*args, f"run_dir=s3://{name}/clean"]) == 0
    monkeypatch.setenv("FORGETTING_RAY_CACHE", str(tmp_path / "node-b"))
    with FaultProxy(s3_endpoint, fault_rate=0.2, seed=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        assert main([*args, f"run_dir=s3://{name}/faulty"]) == 0, capsys.readouterr().err[-3000:]
    assert proxy.counts["503"] + proxy.counts["reset"] >= 3, proxy.counts
    clean, faulty = (_objects(s3, name, f"{run}/prepare/", f"s3://{name}/{run}") for run in ("clean", "faulty"))
    assert len(clean) == 4 and faulty == clean  # tables, manifest (naming its run_dir), marker
