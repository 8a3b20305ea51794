"""Reference/forgetting fine-tunes on the local Ray cluster: 2 workers x 0.5 CPU, tiny models.

Each ``TorchTrainer.fit`` costs ~20 s of worker start-up on 2 cores, so every fit checks several
things.  Weights are fp32 on CPU, so a resumed run must match an uninterrupted one to 1e-6.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from forgetting_ray.config import PipelineConfig
from forgetting_ray.stages.train import FinetuneInputError, run_finetune
from forgetting_ray.train.checkpoint import CheckpointMismatchError, checkpoint_tag, read_state
from forgetting_ray.train.loop import without_timings
from conftest import make_partitioned_table

STEPS_PER_EPOCH = 6  # 48 rows / (2 rows x 2 workers x 2 micro-batches)


@pytest.fixture(scope="module")
def tables(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tables")
    part = make_partitioned_table(tiny_tokenizer_dir, n=48)
    # rows 0-3 (global micro-batch 0: one micro-batch per rank) carry no positive token
    cls = part.column("token_class").to_pylist()
    cls[:4] = [[-1 if c else 0 for c in row] for row in cls[:4]]
    part = part.set_column(part.column_names.index("token_class"), "token_class",
                           pa.array(cls, type=pa.list_(pa.int8())))
    pq.write_table(part, d / "train.parquet")
    pq.write_table(part.drop_columns(["token_class"]), d / "no_class.parquet")
    return {"train": d / "train.parquet", "no_class": d / "no_class.parquet"}


def make_cfg(run_dir: Path, model: Path, **training) -> PipelineConfig:
    t = {"lr": 3e-3, "report_every": 100, "micro_batch_size": 2, "grad_accum": 2, "warmup_ratio": 0.1, "epochs": 2,
         "normalization": "global", "export_dtype": "float32", "lora": {"enabled": False},
         "deepspeed": {"enabled": True, "zero_stage": 3}}
    for k, v in training.items():
        t[k] = {**t[k], **v} if isinstance(v, dict) and isinstance(t.get(k), dict) else v
    return PipelineConfig.model_validate({
        "run_dir": str(run_dir),
        "model": {"name_or_path": str(model)},
        "resources": {"num_workers": 2, "cpus_per_worker": 0.5},
        "training": t,
    })


def assert_trained(result, steps: int = 2 * STEPS_PER_EPOCH, shuffled: bool = False) -> None:
    """The positive NLL falls: epoch 2 revisits epoch 1's micro-batches, so compare like with like."""
    hist = result.metrics
    assert result.global_step == steps == len(hist) and result.stop_reason is None
    first = [m["pos_nll"] for m in hist if m["epoch"] == 0 and m["n_pos"]]
    second = [m["pos_nll"] for m in hist if m["epoch"] == 1 and m["n_pos"]]
    assert np.mean(second) < np.mean(first) - 0.05, (first, second)
    for key in ("loss", "pos_nll", "neg_nll", "lambda", "lr", "grad_norm", "tokens_per_s", "n_pos", "n_neg"):
        assert all(np.isfinite(m[key]) for m in hist), key
    assert all(isinstance(v, (int, float)) for m in hist for v in m.values())  # loggable as MLflow metrics
    assert hist[0]["lambda"] == 0.0 and hist[-1]["lambda"] > hist[1]["lambda"] > 0
    if shuffled:
        return
    # the all-negative rows: one micro-batch per rank on the first step of each epoch
    assert hist[0]["n_microbatches_without_positive"] == 2
    assert hist[-1]["n_microbatches_without_positive_total"] == 4


def concurrently(jobs: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def zero_weights(result) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state, _ = read_state(result.checkpoint_path)
    return get_fp32_state_dict_from_zero_checkpoint(result.checkpoint_path, tag=checkpoint_tag(state.global_step))


def test_bad_inputs_fail_before_any_worker(tmp_path, tables, tiny_llama):
    with pytest.raises(FinetuneInputError) as e:
        run_finetune(make_cfg(tmp_path, tiny_llama), "train", tables["no_class"])
    assert str(tables["no_class"]) in str(e.value) and "'token_class'" in str(e.value)

    with pytest.raises(FinetuneInputError) as e:
        run_finetune(make_cfg(tmp_path, tiny_llama, lora={"enabled": True, "target_modules": ["qkv_proj"]}),
                     "train", tables["train"])
    assert "qkv_proj" in str(e.value) and "q_proj" in str(e.value) and "gate_proj" in str(e.value)

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = make_cfg(tmp_path, tiny_llama)
    cfg.resources.storage_path = str(blocker / "storage")
    with pytest.raises(FinetuneInputError, match="storage path .* is not writable"):
        run_finetune(cfg, "train", tables["train"])
    assert not (tmp_path / "train").exists()  # nothing half-written


def test_zero3_trains_exports_and_resumes_exactly_after_a_worker_crash(ray_cluster, tmp_path, tables, tiny_llama):
    """An uninterrupted run and one whose rank 1 dies after step 6 (Ray restarts the group from the
    step-4 checkpoint), run side by side: same history, same fp32 weights."""
    ck = {"checkpoint_every": 4}
    fault = f"rank=1,after_step=6,marker={tmp_path / 'crashed'}"
    runs = concurrently({
        "clean": lambda: run_finetune(make_cfg(tmp_path / "clean", tiny_llama, **ck), "train", tables["train"]),
        "crash": lambda: run_finetune(make_cfg(tmp_path / "crash", tiny_llama, export=False, **ck), "train",
                                      tables["train"], inject_fault=fault),
    })
    clean, crashed = runs["clean"], runs["crash"]
    assert_trained(clean)
    assert clean.resumed_at == [] and (tmp_path / "crashed").is_file() and crashed.resumed_at == [4]

    assert without_timings(crashed.metrics) == without_timings(clean.metrics)
    a, b = zero_weights(clean), zero_weights(crashed)
    assert a.keys() == b.keys() and len(a) > 10
    assert max(float((a[k] - b[k]).detach().abs().max()) for k in a) <= 1e-6

    manifest = json.loads((clean.export_dir / "manifest.json").read_text())
    assert manifest["validation"]["merged"]["passed"] and not (clean.export_dir / "adapter").exists()
    assert crashed.export_dir is None and (clean.out_dir / "_SUCCESS.json").is_file()
    again = run_finetune(make_cfg(tmp_path / "clean", tiny_llama, **ck), "train", tables["train"])
    assert again.metrics == clean.metrics  # complete: returned without training

    # a checkpoint from another configuration is refused before any worker starts
    other = make_cfg(tmp_path / "other", tiny_llama, lr=1e-3, resume_from=clean.checkpoint_path, **ck)
    with pytest.raises(CheckpointMismatchError, match="finetune.lr"):
        run_finetune(other, "train", tables["train"])


def test_zero2_and_ddp_train_shuffled_and_agree(ray_cluster, tmp_path, tables, tiny_llama):
    """Two independent fits side by side, their 4 workers holding every CPU of the cluster (a seeded shuffle
    that needed a free CPU for Ray Data tasks waited forever here).  Same seed -> same order in both runs;
    ZeRO-2 and DDP with fp32 weights agree step for step, which also checks the two engines' loss scaling."""
    cfgs = {engine: make_cfg(tmp_path / engine, tiny_llama, normalization="micro_batch", export=False, shuffle=True,
                             deepspeed={"enabled": engine != "ddp", "zero_stage": 2})
            for engine in ("zero2", "ddp")}
    assert sum(c.resources.num_workers * c.resources.cpus_per_worker for c in cfgs.values()) == \
        ray_cluster.cluster_resources()["CPU"]
    results = concurrently({e: (lambda c=c: run_finetune(c, "train", tables["train"])) for e, c in cfgs.items()})
    for result in results.values():
        assert_trained(result, shuffled=True)
        assert result.export_dir is None
    z, d = results["zero2"].metrics, results["ddp"].metrics
    for key in ("loss", "pos_nll", "neg_nll", "grad_norm"):
        assert [m[key] for m in z] == pytest.approx([m[key] for m in d], rel=1e-4), key
    assert [m["n_pos"] for m in z] == [m["n_pos"] for m in d]
    # not file order: the all-negative rows 0-3 no longer make up the first global micro-batch
    assert z[0]["n_microbatches_without_positive"] == 0 or z[6]["n_microbatches_without_positive"] == 0


def test_lora_zero3_reference_exports_and_guardrail_stops_divergence(ray_cluster, tmp_path, tables, tiny_llama):
    """Two fits side by side: (a) the reference stage (plain SFT, table without token_class) with LoRA
    under ZeRO-3, exported; (b) a forced divergence (constant lambda 50, lr 3e-2, DDP) that the
    guardrail stops."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ref = make_cfg(tmp_path / "ref", tiny_llama)
    ref.reference = ref.reference.model_validate({
        **ref.training.model_dump(include=set(ref.reference.model_fields)),
        "lr": 2e-2, "lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0},
    })
    div = make_cfg(tmp_path / "div", tiny_llama, deepspeed={"enabled": False}, lr=3e-2, warmup_ratio=0.0,
                   lambda_schedule="constant", t_max=50.0, guardrail_neg_nll_max=7.0, guardrail_action="stop")
    runs = concurrently({"ref": lambda: run_finetune(ref, "reference", tables["no_class"]),
                         "div": lambda: run_finetune(div, "train", tables["train"])})

    result = runs["ref"]
    hist = result.metrics
    assert len(hist) == result.total_steps and all(m["n_neg"] == 0 and m["lambda"] == 0.0 for m in hist)
    first = np.mean([m["pos_nll"] for m in hist if m["epoch"] == 0])
    assert np.mean([m["pos_nll"] for m in hist if m["epoch"] == 1]) < first - 0.05
    adapter = load_file(result.export_dir / "adapter" / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in adapter.items())
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(3))
    merged = AutoModelForCausalLM.from_pretrained(result.export_dir / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        peft = PeftModel.from_pretrained(base, result.export_dir / "adapter").eval()
        lm, lp = merged.eval()(input_ids=ids).logits, peft(input_ids=ids).logits
    assert float((lm - lp).abs().max()) < 1e-4 < float((lp - base_logits).abs().max())

    result = runs["div"]
    assert result.stop_reason and "guardrail_neg_nll_max 7" in result.stop_reason
    assert result.global_step < result.total_steps and result.export_dir is None
    assert result.metrics[-1]["guardrail"] == 2 and result.metrics[-1]["neg_nll"] > 7.0  # 2 = stop
    assert json.loads((result.out_dir / "result.json").read_text())["stop_reason"] == result.stop_reason


@pytest.mark.smollm2
def test_smollm2_lora_smoke_step(ray_cluster, tmp_path, smollm2_dir):
    table = make_partitioned_table(smollm2_dir, n=8, max_len=32)
    pq.write_table(table, tmp_path / "t.parquet")
    cfg = make_cfg(tmp_path, smollm2_dir, max_steps=1, micro_batch_size=1, grad_accum=1, export=False,
                   lora={"enabled": True, "r": 8, "alpha": 16})
    result = run_finetune(cfg, "train", tmp_path / "t.parquet")
    (m,) = result.metrics
    assert result.global_step == 1 and np.isfinite(m["loss"]) and m["n_pos"] > 0 and m["grad_norm"] > 0


def test_mlflow_killed_mid_fit_and_back_loses_no_metric_point(ray_cluster, tmp_path, tables, tiny_llama,
                                                             monkeypatch, caplog):
    """A real `mlflow server`, stopped while the fit is held after step 2: the fit goes on and ends, its writes
    wait in the run's outbox (one warning line); the server back on its port, `forgetting-ray sync` sends them:
    every step's metrics in MLflow once, with the values the fit wrote, and the run FINISHED."""
    from urllib.parse import urlsplit

    from mlflow.tracking import MlflowClient

    from forgetting_ray.cli import main
    from forgetting_ray.faults import TRAIN_FAULT_ENV
    from forgetting_ray.pipeline import _finetune
    from forgetting_ray.tracking import OUTBOX_FILE, Tracker

    from .multinode import serve_mlflow

    cfg = make_cfg(tmp_path, tiny_llama, deepspeed={"enabled": False}, max_steps=4, checkpoint_every=2)
    held = tmp_path / "held-after-step-2"
    monkeypatch.setenv(TRAIN_FAULT_ENV, f"rank=0,after_step=2,marker={held},hold_s=60")
    store, artifacts = f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts"
    journal = Path(cfg.run_dir) / OUTBOX_FILE
    with ThreadPoolExecutor(1) as pool:
        with serve_mlflow(store, artifacts, tmp_path / "mlflow-1.log") as uri:
            tracker = Tracker.start(uri, "outage", "train", journal=journal)
            fit = pool.submit(_finetune, tracker, cfg, "train", tables["train"])
            while not held.exists():
                assert not fit.done(), fit.result()
                time.sleep(0.5)
        Path(f"{held}.release").touch()  # the server is gone: the fit goes on
        result = fit.result()
        tracker.end("FINISHED")
    assert journal.is_file() and caplog.text.count("is not answering") == 1
    with serve_mlflow(store, artifacts, tmp_path / "mlflow-2.log", port=urlsplit(uri).port):
        assert main(["sync", cfg.run_dir, "--tracking-uri", uri]) == 0
        client = MlflowClient(uri)
        history = client.get_metric_history(tracker.run_id, "loss")
        run = client.get_run(tracker.run_id)
    assert sorted((m.step, m.value) for m in history) == [(r["step"], r["loss"]) for r in result.metrics]
    assert [r["step"] for r in result.metrics] == [1, 2, 3, 4] and run.info.status == "FINISHED"
    assert not journal.exists()


def test_step_metrics_reach_mlflow_while_the_fit_runs(ray_cluster, tmp_path, tables, tiny_llama, monkeypatch):
    """The pipeline's driver logs each step as rank 0 sends it: an MLflow query made while the fit is held
    after step 2 sees steps 1-2; at the end every step is in MLflow exactly once."""
    from mlflow.tracking import MlflowClient

    from forgetting_ray.pipeline import _finetune
    from forgetting_ray.tracking import Tracker
    from forgetting_ray.faults import TRAIN_FAULT_ENV

    cfg = make_cfg(tmp_path, tiny_llama, deepspeed={"enabled": False}, max_steps=4, checkpoint_every=2)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"system_metrics": True})})
    held = tmp_path / "held-after-step-2"
    monkeypatch.setenv(TRAIN_FAULT_ENV, f"rank=0,after_step=2,marker={held},hold_s=20")
    tracker = Tracker.start(f"sqlite:///{tmp_path / 'mlflow.db'}", "live", "train")
    client = MlflowClient(tracker.uri)
    with ThreadPoolExecutor(1) as pool:
        fit = pool.submit(_finetune, tracker, cfg, "train", tables["train"])
        while not held.exists():
            assert not fit.done(), fit.result()
            time.sleep(0.5)
        seen: list[int] = []
        deadline = time.monotonic() + 15
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            seen = [m.step for m in client.get_metric_history(tracker.run_id, "loss")]
        assert not fit.done() and sorted(seen) == [1, 2]  # live: the fit has not ended
        Path(f"{held}.release").touch()  # seen: no need to sit out the rest of the hold
        result = fit.result()
    steps = [m.step for m in client.get_metric_history(tracker.run_id, "loss")]
    assert sorted(steps) == [row["step"] for row in result.metrics] == [1, 2, 3, 4]
    # opted in: rank 0's own memory with each step
    rss = client.get_metric_history(tracker.run_id, "system/rank0_rss_gib")
    assert sorted(m.step for m in rss) == [1, 2, 3, 4] and all(0.05 < m.value < 64 for m in rss)
