"""SCORE stage on the local 2-CPU Ray cluster with tiny models: equality with single-process
``token_nll``, the adapter reference, cache hits, resume after a killed driver, corrupt shards and
every bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from forgetting_ray import tiny
from forgetting_ray.config import PipelineConfig
from forgetting_ray.data.table import write_token_table
from forgetting_ray.models import load_model, load_tokenizer, tokenizer_fingerprint
from forgetting_ray.scoring import token_nll
from forgetting_ray.stages.partition import PartitionInputError, run_partition
from forgetting_ray.data.score_set import SCORE_SCHEMA, ScoreValueError, shard_name
from forgetting_ray.faults import SCORE_FAULT_ENV, SCORE_FAULT_EXIT_CODE
from forgetting_ray.stages.score import ScoreInputError, run_score, score_location

from conftest import flan_texts

N_ROWS, SHARD = 36, 8  # 5 shards, the last one short


# ------------------------------------------------------------------------------------------------
# fixtures: a token table, a second model as reference, an export folder with adapter/ + merged/
# ------------------------------------------------------------------------------------------------
def make_rows(tok, n: int, seed: int = 0, special_at: tuple[int, int] | None = None) -> list[dict]:
    """Token-table rows from FLAN texts: lengths 10..72, a prompt of 2..len-2 tokens, two sources."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, text in enumerate(flan_texts(n)):
        ids = tok(text)["input_ids"][: int(rng.integers(10, 73))]
        p = int(rng.integers(2, len(ids) - 1))
        if special_at is not None and k == special_at[0]:
            ids[p + special_at[1]] = tok.convert_tokens_to_ids("<|im_start|>")
        rows.append({
            "sample_id": hashlib.sha256(f"{k}:{text}".encode()).hexdigest()[:16],
            "source": ("aqua", "creak")[k % 2],
            "input_ids": ids,
            "labels": [-100] * p + ids[p:],
        })
    return rows


def write_table(rows: list[dict], folder: Path, fingerprint: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = write_token_table(rows, folder / "train.parquet")
    (folder / "manifest.json").write_text(json.dumps({"tokenizer_fingerprint": fingerprint}))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_llama, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("score")
    tok = load_tokenizer(tiny_llama)
    fp = tokenizer_fingerprint(tok)
    table = write_table(make_rows(tok, N_ROWS), root / "prepare", fp)
    ref = tiny.build_model("llama", tiny_tokenizer_dir, root / "ref", seed=1)

    # export folder as the train stage writes it: a random (non-zero) LoRA and its merged model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    peft_model = get_peft_model(load_model(tiny_llama), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                   target_modules=["q_proj", "v_proj", "down_proj"]))
    export = root / "export"
    peft_model.save_pretrained(export / "adapter")
    peft_model.merge_and_unload().save_pretrained(export / "merged")
    tok.save_pretrained(export / "merged")
    return {"root": root, "tok": tok, "fp": fp, "table": table, "ref": ref, "export": export, "base": tiny_llama}


def make_cfg(run_dir: Path, base: Path, **scoring) -> PipelineConfig:
    sc = {"shard_size": SHARD, "concurrency": 2, "num_cpus_per_actor": 0.5, "batch_size": 8, "batch_tokens": 256}
    return PipelineConfig.model_validate({"run_dir": str(run_dir), "model": {"name_or_path": str(base)},
                                          "scoring": {**sc, **scoring}})


def read_scores(score_dir: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(score_dir.glob("shard-*.parquet")))


def single_process_scores(base: Path, ref: Path, rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Unbatched, unpadded token_nll per row: the ground truth the Ray pipeline must reproduce."""
    mb, mr = load_model(base).eval(), load_model(ref).eval()
    out = {}
    with torch.inference_mode():
        for r in rows:
            ids, labels = torch.tensor([r["input_ids"]]), torch.tensor([r["labels"]])
            keep = labels[0] != -100
            out[r["sample_id"]] = (token_nll(mb, ids, None, labels)[0][keep].numpy(),
                                   token_nll(mr, ids, None, labels)[0][keep].numpy())
    return out


@pytest.fixture(scope="module")
def scored(env, ray_cluster):
    """One uninterrupted run with a plain-folder reference, 2 actors."""
    cfg = make_cfg(env["root"] / "run_full", env["base"])
    return cfg, run_score(cfg, env["table"], env["ref"])


def stamps(paths) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


# ------------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------------
def test_ray_scores_equal_single_process_token_nll(env, scored):
    cfg, res = scored
    assert not res.cached and sorted(res.shards_scored) == list(range(5)) and res.reference_mode == "plain"
    assert [p.name for p in sorted(res.dir.glob("shard-*.parquet"))] == [shard_name(i) for i in range(5)]
    rows = pq.read_table(env["table"]).to_pylist()
    got = read_scores(res.dir)
    assert got.schema == SCORE_SCHEMA
    assert got.column("sample_id").to_pylist() == [r["sample_id"] for r in rows]  # table order
    for i in range(5):  # shard i = rows [8i, 8i+8)
        ids = pq.read_table(res.dir / shard_name(i)).column("sample_id").to_pylist()
        assert ids == [r["sample_id"] for r in rows[i * SHARD : (i + 1) * SHARD]]
    truth = single_process_scores(env["base"], env["ref"], rows)
    for r in got.to_pylist():
        nb, nr = truth[r["sample_id"]]
        assert len(r["score"]) == len(nb) > 0
        np.testing.assert_allclose(r["nll_base"], nb, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(r["nll_ref"], nr, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(r["score"], np.float32(r["nll_base"]) - np.float32(r["nll_ref"]), atol=1e-6)
    done = json.loads((res.dir / "_SUCCESS.json").read_text())
    assert done["n_samples"] == N_ROWS and done["n_shards"] == 5
    assert done["n_response_tokens"] == sum(sum(x != -100 for x in r["labels"]) for r in rows)
    assert res.stats["padded_tokens"] >= res.stats["real_tokens"] > 0


def footer_reader_actors() -> int:
    """Ray Data's parquet footer actors this cluster has started (alive or killed)."""
    import ray
    from ray.util.state import list_actors

    return len(list_actors(address=ray.get_runtime_context().gcs_address, filters=[("class_name", "=", "FooterReader")],
                           limit=10_000, raise_on_missing_output=False))


def test_adapter_reference_matches_merged_weights(env, scored, ray_cluster):
    cfg = make_cfg(env["root"] / "run_adapter", env["base"], concurrency=1)
    started = footer_reader_actors()
    res = run_score(cfg, env["table"], env["export"])
    # the token table is one file: one footer actor, not Ray's default 32 (cluster.session.one_footer_actor)
    assert footer_reader_actors() - started == 1
    assert res.reference_mode == "adapter"  # one base copy per actor, LoRA toggled for the base pass
    got, plain = read_scores(res.dir).to_pylist(), read_scores(scored[1].dir).to_pylist()
    rows = pq.read_table(env["table"]).to_pylist()
    truth = single_process_scores(env["base"], env["export"] / "merged", rows)
    for r, p in zip(got, plain):
        np.testing.assert_allclose(r["nll_base"], p["nll_base"], atol=1e-5)  # disable_adapter() = the base
        np.testing.assert_allclose(r["nll_ref"], truth[r["sample_id"]][1], atol=1e-4)
    assert not np.allclose(np.concatenate([r["nll_ref"] for r in got]), np.concatenate([r["nll_base"] for r in got]))


# ------------------------------------------------------------------------------------------------
# cache and resume
# ------------------------------------------------------------------------------------------------
def test_cache_hit_and_key_ignores_batching_but_not_dtype(env, scored, caplog):
    cfg, first = scored
    before = stamps(first.shard_paths())
    again = make_cfg(cfg.run_dir, env["base"], batch_size=3, concurrency=1, batch_tokens=64)
    with caplog.at_level("INFO", logger="forgetting_ray.stages.score"):
        res = run_score(again, env["table"], env["ref"])
    assert res.cached and res.dir == first.dir and res.shards_scored == []
    assert f"reusing cached scores at {first.dir}" in caplog.text
    assert stamps(first.shard_paths()) == before
    bf16 = cfg.model_copy(deep=True)
    bf16.model.dtype = "bfloat16"
    assert score_location(bf16, env["table"], env["ref"])[0] != first.key
    other = write_table(make_rows(env["tok"], 10, seed=5), env["root"] / "other", env["fp"])
    assert score_location(cfg, other, env["ref"])[0] != first.key
    assert score_location(cfg, env["table"], env["export"])[0] != first.key


def test_resume_after_killed_driver_recomputes_no_finished_shard(env, scored, ray_cluster, tmp_path):
    """Kill a subprocess driver after 3 shards, truncate one of them, rerun: the 2 intact shards are
    never rewritten, the truncated one is rescored with a warning, the result equals an uninterrupted run."""
    cfg = make_cfg(tmp_path / "run", env["base"], concurrency=1)
    script = textwrap.dedent(f"""
        from forgetting_ray.config import PipelineConfig
        from forgetting_ray.stages.score import run_score
        cfg = PipelineConfig.model_validate_json({cfg.model_dump_json(by_alias=True)!r})
        run_score(cfg, {str(env['table'])!r}, {str(env['ref'])!r})
        raise SystemExit("the fault hook did not fire")
    """)
    child_env = {**os.environ, SCORE_FAULT_ENV: "exit_after_shards=3",
                 "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-c", script], env=child_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == SCORE_FAULT_EXIT_CODE, proc.stderr[-3000:]
    key, out = score_location(cfg, env["table"], env["ref"])
    finished = sorted(out.glob("shard-*.parquet"))
    assert len(finished) == 3 and not (out / "_SUCCESS.json").exists()
    broken, intact = finished[1], [finished[0], finished[2]]
    broken.write_bytes(broken.read_bytes()[:200])  # as if the disk lost the end of the file
    before = stamps(intact)

    with pytest.warns(UserWarning, match=rf"{broken.name} is corrupt.*rescored"):
        res = run_score(cfg, env["table"], env["ref"])
    shard_ids = [int(p.name[6:11]) for p in intact]
    assert sorted(res.shards_reused) == shard_ids
    assert sorted(res.shards_scored) == sorted(set(range(5)) - set(shard_ids))
    assert stamps(intact) == before  # same inode and mtime: never rewritten
    assert (out / "_SUCCESS.json").exists()
    full, resumed = read_scores(scored[1].dir), read_scores(out)
    assert resumed.column("sample_id").to_pylist() == full.column("sample_id").to_pylist()
    for a, b in zip(resumed.column("score").to_pylist(), full.column("score").to_pylist()):
        np.testing.assert_allclose(a, b, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["tokenizer", "vocab_size"])
def test_reference_with_another_vocabulary_fails_before_any_work(env, tmp_path, what):
    ref = tmp_path / "ref"
    if what == "tokenizer":
        tiny.build_tokenizer(flan_texts(500), tmp_path / "tok", vocab_size=600)
        tiny.build_model("llama", tmp_path / "tok", ref)
        match = "reference tokenizer .* differs"
    else:  # same tokenizer, resized embeddings
        cfg = tiny.tiny_config("llama", vocab_size=len(env["tok"]) + 8, eos_token_id=env["tok"].eos_token_id)
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_config(cfg).save_pretrained(ref)
        env["tok"].save_pretrained(ref)
        match = "vocabulary sizes differ"
    cfg = make_cfg(tmp_path / "run", env["base"])
    with pytest.raises(ScoreInputError, match=match):
        run_score(cfg, env["table"], ref)
    assert not (tmp_path / "run").exists()


def test_table_from_another_tokenizer_fails(env, tmp_path):
    rows = pq.read_table(env["table"]).to_pylist()
    table = write_table(rows, tmp_path / "prepare", fingerprint="0123456789abcdef")
    with pytest.raises(ScoreInputError, match="tokenizer fingerprint 0123456789abcdef"):
        run_score(make_cfg(tmp_path / "run", env["base"]), table, env["ref"])
    assert not (tmp_path / "run").exists()


def test_empty_table_fails(env, tmp_path):
    table = write_table([], tmp_path / "prepare", env["fp"])
    with pytest.raises(ScoreInputError, match="has no rows"):
        run_score(make_cfg(tmp_path / "run", env["base"]), table, env["ref"])


def test_nonfinite_score_names_sample_and_position(env, ray_cluster, tmp_path):
    # The reference maps one token (never seen in plain text) to a NaN embedding; one sample contains it.
    ref = tmp_path / "nan_ref"
    model = load_model(env["ref"])
    special = env["tok"].convert_tokens_to_ids("<|im_start|>")
    with torch.no_grad():
        model.get_input_embeddings().weight[special] = float("nan")
    model.save_pretrained(ref)
    env["tok"].save_pretrained(ref)
    rows = make_rows(env["tok"], 8, seed=1, special_at=(5, 2))
    table = write_table(rows, tmp_path / "prepare", env["fp"])
    nb, nr = single_process_scores(env["base"], ref, [rows[5]])[rows[5]["sample_id"]]
    first_bad = int(np.flatnonzero(~np.isfinite(nb - nr))[0])
    position = int(np.flatnonzero(np.array(rows[5]["labels"]) != -100)[first_bad])

    cfg = make_cfg(tmp_path / "run", env["base"], concurrency=1, shard_size=4)
    with pytest.raises(ScoreValueError, match=f"sample_id {rows[5]['sample_id']} at token position {position} "):
        run_score(cfg, table, ref)
    out = score_location(cfg, table, ref)[1]
    assert not (out / shard_name(1)).exists() and not (out / "_SUCCESS.json").exists()
    with pytest.raises(PartitionInputError, match="not complete"):
        run_partition(cfg, table, out)
    assert not (tmp_path / "run" / "partition").exists()
