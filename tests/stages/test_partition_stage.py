"""PARTITION stage on hand-made score sets (no Ray): exactness against ``selection.partition``,
alignment of ``token_class`` with labels, per-source fractions, determinism, caching, bad input."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forgetting_ray.config import PipelineConfig
from forgetting_ray.data.table import read_token_table, token_table_hash, write_token_table
from forgetting_ray.selection import partition
from forgetting_ray.stages.partition import PartitionInputError, run_partition
from forgetting_ray.data.score_set import SCORE_SCHEMA, ScoreValueError, shard_name
from forgetting_ray.store import mark_complete

SOURCES = ("aqua", "creak", "qasc")


def make_table(path, n: int = 23, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        length = int(rng.integers(4, 40))
        ids = rng.integers(0, 500, size=length).tolist()
        p = int(rng.integers(1, length))  # at least one response token
        rows.append({"sample_id": hashlib.sha256(str((seed, k)).encode()).hexdigest()[:16],
                     "source": SOURCES[k % 3], "input_ids": ids, "labels": [-100] * p + ids[p:]})
    return write_token_table(rows, path)


def make_scores(table_path, out, shard_size: int = 5, seed: int = 0, key: str = "k" * 16, poison=None):
    """Shards as the score stage writes them; scores rounded to 0.1 so there are many ties.
    ``poison=(row, response_index, value)`` plants a non-finite score."""
    table = read_token_table(table_path)
    rng = np.random.default_rng(seed)
    n_resp = table.column("n_response").to_pylist()
    scores = [np.round(rng.normal(size=k), 1).astype(np.float32) for k in n_resp]
    if poison is not None:
        scores[poison[0]][poison[1]] = poison[2]
    ids = table.column("sample_id").to_pylist()
    n_shards = math.ceil(len(ids) / shard_size)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n_shards):
        sl = slice(i * shard_size, (i + 1) * shard_size)
        s = [x.tolist() for x in scores[sl]]
        pq.write_table(pa.table({"sample_id": ids[sl], "nll_base": s, "nll_ref": [[0.0] * len(x) for x in s],
                                 "score": s}).cast(SCORE_SCHEMA), out / shard_name(i))
    mark_complete(out, {"stage": "score", "key": key, "n_samples": len(ids), "n_shards": n_shards,
                        "shard_size": shard_size, "n_response_tokens": int(sum(n_resp)),
                        "table_hash": token_table_hash(table)})
    return scores


def cfg_for(run_dir, rho: float = 0.7) -> PipelineConfig:
    return PipelineConfig.model_validate({"run_dir": str(run_dir), "selection": {"rho": rho, "histogram_bins": 20}})


@pytest.fixture()
def scored(tmp_path):
    table = make_table(tmp_path / "train.parquet")
    scores = make_scores(table, tmp_path / "scores")
    return table, tmp_path / "scores", scores


@pytest.mark.parametrize("rho", [0.3, 0.7, 1.0])
def test_partition_is_exact_global_top_rho_aligned_with_labels(scored, tmp_path, rho):
    table_path, score_dir, scores = scored
    res = run_partition(cfg_for(tmp_path / "run", rho), table_path, score_dir)
    flat = np.concatenate(scores)
    expected = partition(flat, rho)  # the in-memory reference answer, ties by global index
    assert res.n_tokens == flat.size and res.n_positive == math.floor(flat.size * rho) == int((expected == 1).sum())
    assert res.n_negative == flat.size - res.n_positive

    out = pq.read_table(res.train_path)
    src = read_token_table(table_path)
    assert out.schema.field("token_class").type == pa.list_(pa.int8())
    assert out.drop_columns(["token_class"]).equals(src)  # same rows, same order, untouched
    got = []
    for labels, cls in zip(out.column("labels").to_pylist(), out.column("token_class").to_pylist()):
        labels, cls = np.array(labels), np.array(cls)
        assert cls.shape == labels.shape
        assert (cls[labels == -100] == 0).all() and np.isin(cls[labels != -100], (-1, 1)).all()
        got.append(cls[labels != -100])
    np.testing.assert_array_equal(np.concatenate(got), expected)

    info = json.loads(res.info_path.read_text())
    assert info["N"] == flat.size and info["n_positive"] == res.n_positive and info["rho"] == rho
    tau = info["threshold"]
    assert (flat[expected == 1] >= tau).all() and (flat[expected == -1] <= tau).all()
    token_source = np.repeat(src.column("source").to_pylist(), src.column("n_response").to_pylist())
    for name in SOURCES:
        m = token_source == name
        assert info["fraction_positive_by_source"][name]["n_tokens"] == int(m.sum())
        frac = info["fraction_positive_by_source"][name]["fraction_positive"]
        assert frac == pytest.approx((expected[m] == 1).mean())
    assert sum(info["histogram"]["counts"]) == flat.size
    assert res.histogram_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_partition_is_deterministic_cached_and_keyed_by_rho(scored, tmp_path, caplog):
    table_path, score_dir, _ = scored
    a = run_partition(cfg_for(tmp_path / "a"), table_path, score_dir)
    b = run_partition(cfg_for(tmp_path / "b"), table_path, score_dir)
    assert a.key == b.key and not a.cached
    assert pq.read_table(a.train_path).equals(pq.read_table(b.train_path))
    ja, jb = json.loads(a.info_path.read_text()), json.loads(b.info_path.read_text())
    assert ja == jb
    mtime = a.train_path.stat().st_mtime_ns
    again = run_partition(cfg_for(tmp_path / "a"), table_path, score_dir)
    assert again.cached and again.n_positive == a.n_positive and a.train_path.stat().st_mtime_ns == mtime
    other = run_partition(cfg_for(tmp_path / "a", rho=0.5), table_path, score_dir)
    assert other.key != a.key and other.n_positive != a.n_positive


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_score_names_sample_and_position_and_writes_nothing(tmp_path, bad):
    table_path = make_table(tmp_path / "train.parquet")
    rows = read_token_table(table_path).to_pylist()
    make_scores(table_path, tmp_path / "scores", poison=(7, 1, bad))
    position = int(np.flatnonzero(np.array(rows[7]["labels"]) != -100)[1])
    with pytest.raises(ScoreValueError, match=f"sample_id {rows[7]['sample_id']} at token position {position} "
                                              rf"\(response token #1\) in .*{shard_name(1)}"):
        run_partition(cfg_for(tmp_path / "run"), table_path, tmp_path / "scores")
    assert not (tmp_path / "run" / "partition").exists()


def test_incomplete_or_foreign_score_set_is_rejected(tmp_path):
    table_path = make_table(tmp_path / "train.parquet")
    make_scores(table_path, tmp_path / "scores")
    (tmp_path / "scores" / "_SUCCESS.json").unlink()
    with pytest.raises(PartitionInputError, match=rf"^score set {tmp_path / 'scores'} is not complete"):
        run_partition(cfg_for(tmp_path / "run"), table_path, tmp_path / "scores")
    other = make_table(tmp_path / "other.parquet", seed=1)
    make_scores(other, tmp_path / "other_scores")
    with pytest.raises(PartitionInputError, match=rf"^score set {tmp_path / 'other_scores'} was computed for a "
                                                 rf"different token table than {table_path}"):
        run_partition(cfg_for(tmp_path / "run"), table_path, tmp_path / "other_scores")


# ------------------------------------------------------------------------------------------------
# variants beyond the paper: computed from the stored NLLs, keyed into the partition, not the scores
# ------------------------------------------------------------------------------------------------
def make_nll_scores(table_path, out, *, gain: float = 0.5, shard_size: int = 5, seed: int = 1):
    """Shards with real-looking NLLs: base in (0.05, 6), reference lower by ``gain`` on average."""
    table = read_token_table(table_path)
    rng = np.random.default_rng(seed)
    n_resp = table.column("n_response").to_pylist()
    base = [rng.uniform(0.05, 6.0, size=k).astype(np.float32) for k in n_resp]
    ref = [np.clip(b - gain + rng.normal(0, max(gain, 1e-3), size=b.size), 0.01, None).astype(np.float32) for b in base]
    ids = table.column("sample_id").to_pylist()
    n_shards = math.ceil(len(ids) / shard_size)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n_shards):
        sl = slice(i * shard_size, (i + 1) * shard_size)
        pq.write_table(pa.table({"sample_id": ids[sl], "nll_base": [b.tolist() for b in base[sl]],
                                 "nll_ref": [r.tolist() for r in ref[sl]],
                                 "score": [(b - r).tolist() for b, r in zip(base[sl], ref[sl])]}).cast(SCORE_SCHEMA),
                       out / shard_name(i))
    mark_complete(out, {"stage": "score", "key": "v" * 16, "n_samples": len(ids), "n_shards": n_shards,
                        "shard_size": shard_size, "n_response_tokens": int(sum(n_resp)),
                        "table_hash": token_table_hash(table)})
    return base, ref


def naive_variant(base, ref, variant):
    """Token by token, sequence by sequence: the formulas as written."""
    out = []
    for b, r in zip(base, ref):
        b, r = b.astype(np.float64), r.astype(np.float64)
        if variant == "relative":
            out.append([(x - y) / x for x, y in zip(b, r)])
        elif variant == "prob_gain":
            out.append([math.exp(-y) - math.exp(-x) for x, y in zip(b, r)])
        elif variant == "zscore":
            d = b - r
            mu = sum(d) / len(d)
            sd = math.sqrt(sum((x - mu) ** 2 for x in d) / len(d) + 1e-6)
            out.append([(x - mu) / sd for x in d])
        else:
            out.append(list(b - r))
    return np.concatenate([np.asarray(o, dtype=np.float32) for o in out])


def classes_of(res) -> np.ndarray:
    out = pq.read_table(res.train_path)
    return np.concatenate([np.array(c)[np.array(lab) != -100] for lab, c in
                           zip(out.column("labels").to_pylist(), out.column("token_class").to_pylist())])


def selection_cfg(run_dir, **selection) -> PipelineConfig:
    return PipelineConfig.model_validate({"run_dir": str(run_dir),
                                          "selection": {"rho": 0.6, "histogram_bins": 20, **selection}})


@pytest.mark.parametrize("variant", ["relative", "prob_gain", "zscore"])
def test_score_variants_rank_by_their_formula_and_leave_the_scores_alone(tmp_path, variant):
    table = make_table(tmp_path / "train.parquet", n=31)
    base, ref = make_nll_scores(table, tmp_path / "scores")
    stored = {p.name: p.read_bytes() for p in (tmp_path / "scores").iterdir()}
    paper = run_partition(selection_cfg(tmp_path / "run"), table, tmp_path / "scores")
    res = run_partition(selection_cfg(tmp_path / "run", score=variant), table, tmp_path / "scores")
    np.testing.assert_array_equal(classes_of(res), partition(naive_variant(base, ref, variant), 0.6))
    assert res.key != paper.key and res.n_positive == paper.n_positive
    assert not np.array_equal(classes_of(res), classes_of(paper))
    assert {p.name: p.read_bytes() for p in (tmp_path / "scores").iterdir()} == stored  # scores untouched
    assert json.loads(res.info_path.read_text())["selection"] == {"score": variant}


def test_three_way_split_ignores_the_middle_and_the_floor_protects_predictable_tokens(tmp_path):
    table = make_table(tmp_path / "train.parquet", n=31)
    base, ref = make_nll_scores(table, tmp_path / "scores")
    flat, b = naive_variant(base, ref, "difference"), np.concatenate(base)
    paper = partition(flat, 0.6)
    k_neg = math.floor(flat.size * 0.2)

    bottom = classes_of(run_partition(selection_cfg(tmp_path / "run", negative_fraction=0.2), table, tmp_path / "scores"))
    assert ((bottom == 1) == (paper == 1)).all()  # the positives do not change
    assert (bottom == -1).sum() == k_neg and (flat[bottom == -1] <= np.sort(flat)[k_neg - 1]).all()
    assert ((bottom == 0) == ((paper == -1) & (bottom != -1))).all()

    res = run_partition(selection_cfg(tmp_path / "run", negative_margin=0.5), table, tmp_path / "scores")
    tau = json.loads(res.info_path.read_text())["threshold"]
    margin = classes_of(res)
    np.testing.assert_array_equal(margin == -1, (paper == -1) & (flat <= np.float32(tau) - 0.5))
    assert res.n_negative == int((margin == -1).sum()) and json.loads(res.info_path.read_text())["n_ignored"] > 0

    floor = classes_of(run_partition(selection_cfg(tmp_path / "run", base_nll_floor=1.0), table, tmp_path / "scores"))
    np.testing.assert_array_equal(floor == -1, (paper == -1) & (b >= 1.0))
    assert ((floor == 1) == (paper == 1)).all()


def test_a_reference_that_barely_moved_is_reported_and_warned_about(tmp_path, caplog):
    table = make_table(tmp_path / "train.parquet", n=31)
    base, ref = make_nll_scores(table, tmp_path / "learned", gain=0.5)
    res = run_partition(selection_cfg(tmp_path / "a"), table, tmp_path / "learned")
    info = json.loads(res.info_path.read_text())
    b, r = np.concatenate(base).astype(np.float64), np.concatenate(ref).astype(np.float64)
    assert info["nll"]["mean_nll_base"] == pytest.approx(b.mean()) and info["nll"]["heldout_gain"] == pytest.approx(b.mean() - r.mean())
    assert not info["reference_barely_differs"]
    q = info["nll"]["base_nll_quantiles"]
    assert q["negative"]["p50"] != q["positive"]["p50"]  # the two groups' base NLLs, side by side
    assert sum(info["nll"]["base_nll_histogram"]["negative"]) == res.n_negative

    make_nll_scores(table, tmp_path / "unmoved", gain=0.0)
    with caplog.at_level("WARNING", logger="forgetting_ray"):
        res = run_partition(selection_cfg(tmp_path / "b"), table, tmp_path / "unmoved")
    assert json.loads(res.info_path.read_text())["reference_barely_differs"]
    assert "barely differs from the base model" in caplog.text


def test_selection_options_are_checked():
    with pytest.raises(ValueError, match="not both"):
        PipelineConfig.model_validate({"selection": {"negative_fraction": 0.1, "negative_margin": 0.1}})
    with pytest.raises(ValueError, match="exceeds 1"):
        PipelineConfig.model_validate({"selection": {"rho": 0.9, "negative_fraction": 0.2}})
