"""Storage paths that may be object storage (forgetting_ray.store), against a real S3-compatible server (moto)."""

from __future__ import annotations

import socket

import boto3
import pytest
from moto.server import ThreadedMotoServer

from forgetting_ray.config import PipelineConfig
from forgetting_ray.ray_utils import default_storage_path
from forgetting_ray.stages.train import FinetuneInputError, check_storage
from forgetting_ray.store import StorageNotWritable, is_uri, join_storage, probe_storage


@pytest.fixture(scope="module")
def s3_endpoint():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch):
    """A fresh bucket, with the standard AWS variables pointing at the local server."""
    for k, v in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"runs-{len(s3.list_buckets()['Buckets'])}"
    s3.create_bucket(Bucket=name)
    return name, s3


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


def test_missing_bucket_or_bad_endpoint_is_a_clear_error_before_any_worker(bucket, monkeypatch):
    with pytest.raises(FinetuneInputError, match=r"storage path s3://no-such-bucket/x is not writable \(.+\).*"
                                                 r"AWS_ENDPOINT_URL"):
        check_storage("s3://no-such-bucket/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(StorageNotWritable):
        probe_storage(f"s3://{bucket[0]}/run")


def test_local_storage_is_created_and_a_file_in_the_way_is_reported(tmp_path):
    assert probe_storage(tmp_path / "a" / "b") == str((tmp_path / "a" / "b").resolve())
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageNotWritable, match="is not writable"):
        probe_storage(tmp_path / "file" / "sub")


def test_storage_path_uri_reaches_ray_train_unchanged(bucket):
    cfg = PipelineConfig.model_validate({"resources": {"storage_path": f"s3://{bucket[0]}/train"}})
    assert check_storage(cfg.resources.storage_path) == f"s3://{bucket[0]}/train"
