"""Storage paths that may be object storage (forgetting_ray.store), against a real S3-compatible server (moto)."""

from __future__ import annotations

import pytest

from forgetting_ray.cluster.session import default_storage_path
from forgetting_ray.config import PipelineConfig
from forgetting_ray.stages.train import FinetuneInputError, check_storage
from forgetting_ray import store
from forgetting_ray.store import (
    DONE_MARKER,
    StorageNotWritable,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    fetch_partial,
    is_complete,
    is_uri,
    join_storage,
    local_copy,
    local_path,
    mark_complete,
    portable,
    probe_storage,
    read_done,
    remote_of,
    run_root,
    stage_dir,
    unmark_complete,
)


def test_uri_paths_are_joined_as_uris_not_as_local_folders(tmp_path):
    assert is_uri("s3://b/x") and is_uri("gs://b") and not is_uri(tmp_path)
    assert join_storage("s3://bucket/run/", "ray_storage", "trial") == "s3://bucket/run/ray_storage/trial"
    assert default_storage_path("s3://bucket/run") == "s3://bucket/run/ray_storage"
    assert default_storage_path(tmp_path / "run") == str((tmp_path / "run" / "ray_storage").resolve())


def test_probe_writes_to_a_bucket_and_leaves_no_probe_behind(bucket):
    name, s3 = bucket
    assert probe_storage(f"s3://{name}/run/ray_storage") == f"s3://{name}/run/ray_storage"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=name).get("Contents", [])]
    assert not [k for k in keys if ".write-probe-" in k]


def test_missing_bucket_is_a_clear_error_before_any_worker(bucket):
    # an endpoint that does not answer: test_an_unreachable_bucket_run_dir_is_one_clear_error (the same probe;
    # the AWS SDK retries a refused connection for 12 s, paid once)
    with pytest.raises(FinetuneInputError, match=r"storage path s3://no-such-bucket/x is not writable \(.+\).*"
                                                 r"AWS_ENDPOINT_URL"):
        check_storage("s3://no-such-bucket/x")


def test_local_storage_is_created_and_a_file_in_the_way_is_reported(tmp_path):
    assert probe_storage(tmp_path / "a" / "b") == str((tmp_path / "a" / "b").resolve())
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageNotWritable, match="is not writable"):
        probe_storage(tmp_path / "file" / "sub")


def test_storage_path_uri_reaches_ray_train_unchanged(bucket):
    cfg = PipelineConfig.model_validate({"resources": {"storage_path": f"s3://{bucket[0]}/train"}})
    assert check_storage(cfg.resources.storage_path) == f"s3://{bucket[0]}/train"


# ------------------------------------------------------------------------------------------------
# a run directory in a bucket: the node-local mirror
# ------------------------------------------------------------------------------------------------
def _keys(s3, name: str, prefix: str = "") -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=name, Prefix=prefix).get("Contents", []))


def _node(monkeypatch, tmp_path, name: str) -> None:
    """Act as another node: its own, empty cache (where its mirrors and fetched copies live)."""
    monkeypatch.setenv("FORGETTING_RAY_CACHE", str(tmp_path / name))


def test_a_bucket_run_writes_through_its_mirror_and_the_marker_comes_last(bucket, tmp_path, monkeypatch):
    name, s3 = bucket
    _node(monkeypatch, tmp_path, "head")
    run = f"s3://{name}/run"
    out = stage_dir(run, "prepare", "k1")
    assert out.is_relative_to(tmp_path / "head") and remote_of(out) == f"{run}/prepare/k1"
    order = []
    real_upload = store._upload_file
    monkeypatch.setattr(store, "_upload_file", lambda fs, f, r: (order.append(r.rsplit("/", 1)[-1]), real_upload(fs, f, r)))
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b.parquet").write_bytes(b"x" * 100)
        atomic_write_json(tmp / "a.json", {"a": 1})  # inside the temporary folder: not uploaded on its own
    assert not is_complete(out)  # the files are there, the marker is not: not done
    mark_complete(out, {"key": "k1"})
    assert order[-1] == DONE_MARKER and order.count("b.parquet") == 1  # uploaded once, the marker last
    assert _keys(s3, name, "run/") == ["run/prepare/k1/_SUCCESS.json", "run/prepare/k1/a.json",
                                       "run/prepare/k1/b.parquet"]

    _node(monkeypatch, tmp_path, "fresh")  # a fresh head reuses the stage from the bucket
    again = stage_dir(run, "prepare", "k1")
    assert again != out and not again.exists()
    assert is_complete(again) and (again / "b.parquet").read_bytes() == b"x" * 100
    assert read_done(again) == {"key": "k1"}


def test_a_killed_stage_leaves_nothing_that_looks_done_and_resumes_from_the_bucket(bucket, tmp_path, monkeypatch):
    name, s3 = bucket
    _node(monkeypatch, tmp_path, "a")
    out = stage_dir(f"s3://{name}/run", "score", "k")
    atomic_write_json(out / "layout.json", {"n": 2})
    atomic_write_bytes(out / "shard-00000.parquet", b"one")  # then the node dies
    _node(monkeypatch, tmp_path, "b")
    again = stage_dir(f"s3://{name}/run", "score", "k")
    assert not is_complete(again)
    fetch_partial(again)
    assert sorted(p.name for p in again.iterdir()) == ["layout.json", "shard-00000.parquet"]
    mark_complete(again, {"n": 2})
    unmark_complete(again)  # e.g. shards found missing: the bucket forgets the stage first
    assert "run/score/k/_SUCCESS.json" not in _keys(s3, name) and not is_complete(again)


def test_portable_locations_map_back_into_each_nodes_mirror(bucket, tmp_path, monkeypatch):
    name, _ = bucket
    run = f"s3://{name}/run"
    _node(monkeypatch, tmp_path, "a")
    table = run_root(run) / "prepare" / "k" / "train.parquet"
    assert portable(table) == f"{run}/prepare/k/train.parquet"
    _node(monkeypatch, tmp_path, "b")
    assert local_path(portable(table), run) == run_root(run) / "prepare" / "k" / "train.parquet"
    assert local_path(tmp_path / "x", run) == tmp_path / "x" and portable(tmp_path / "x") == str(tmp_path / "x")
    with pytest.raises(ValueError, match="not inside the run directory"):
        local_path(f"s3://{name}/elsewhere/x", run)


def test_a_model_in_a_bucket_is_fetched_once_per_node_into_a_content_addressed_copy(bucket, tmp_path, monkeypatch):
    name, s3 = bucket
    s3.put_object(Bucket=name, Key="models/m/config.json", Body=b"{}")
    s3.put_object(Bucket=name, Key="models/m/model.safetensors", Body=b"w1")
    _node(monkeypatch, tmp_path, "worker")
    downloads = []
    real = store._download
    monkeypatch.setattr(store, "_download", lambda *a: (downloads.append(a[1]), real(*a)))
    first = local_copy(f"s3://{name}/models/m")
    assert first.is_relative_to(tmp_path / "worker" / "fetched")
    assert (first / "model.safetensors").read_bytes() == b"w1"
    assert local_copy(f"s3://{name}/models/m") == first and len(downloads) == 1  # once per node
    s3.put_object(Bucket=name, Key="models/m/model.safetensors", Body=b"w2-changed")
    changed = local_copy(f"s3://{name}/models/m")
    assert changed != first and (changed / "model.safetensors").read_bytes() == b"w2-changed"
    with pytest.raises(FileNotFoundError, match="no objects"):
        local_copy(f"s3://{name}/models/none")


def test_an_unreachable_bucket_run_dir_is_one_clear_error(bucket, monkeypatch):
    from forgetting_ray.cluster.run_dir import RunDirError, check_run_dir

    with pytest.raises(RunDirError, match=r"run_dir s3://no-such-bucket/run is not writable.*AWS_ENDPOINT_URL"):
        check_run_dir("s3://no-such-bucket/run")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(RunDirError, match="not writable"):
        check_run_dir(f"s3://{bucket[0]}/run")


def test_a_fetched_copy_travels_as_the_uri_it_came_from(bucket, tmp_path, monkeypatch):
    name, s3 = bucket
    s3.put_object(Bucket=name, Key="models/m/merged/config.json", Body=b"{}")
    _node(monkeypatch, tmp_path, "head")
    copy = local_copy(f"s3://{name}/models/m")
    assert portable(copy) == f"s3://{name}/models/m"
    assert portable(copy / "merged") == f"s3://{name}/models/m/merged"
    assert portable(tmp_path / "head" / "fetched") == str(tmp_path / "head" / "fetched")
