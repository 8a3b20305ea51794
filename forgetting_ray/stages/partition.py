"""PARTITION stage: exact global top-rho split of the response-token scores (docs/method.md §5).

Recipe (``run_partition``): check the score set is complete and belongs to this token table ->
key the output by (score key, rho) -> pass 0 over the shards validates them (finite, aligned with
the table) and gathers the histogram range -> ``selection.find_threshold`` finds the exact k-th
largest score in two streaming passes -> a last pass applies it shard by shard (ties go to the lower
global index, as ``selection.partition``) and streams the partitioned table, histogram and
per-source counts -> ``train.parquet``, ``partition.json``, ``score_histogram.png`` appear together.

Only one shard of scores is in memory at a time; the token table is read once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import PipelineConfig
from ..data.table import IGNORE_INDEX, TokenTableError, read_token_table, token_table_hash
from ..errors import UserError
from ..selection import NEGATIVE, POSITIVE, Threshold, find_threshold
from ..store import atomic_dir, atomic_write_json, content_hash, is_complete, mark_complete, read_done, stage_dir
from ..data.score_set import find_nonfinite, nonfinite_error, shard_name

log = logging.getLogger(__name__)

STAGE = "partition"
PARTITION_VERSION = 1
TABLE_FILE, INFO_FILE, HISTOGRAM_FILE = "train.parquet", "partition.json", "score_histogram.png"


class PartitionInputError(UserError, ValueError):
    """The score set is missing, incomplete, or belongs to another token table."""


@dataclass(frozen=True)
class PartitionResult:
    dir: Path
    key: str
    train_path: Path  # the partitioned table (token-table rows + token_class)
    info_path: Path
    histogram_path: Path
    n_tokens: int
    n_positive: int
    n_negative: int
    threshold: float | None  # None when rho is so small that no token is positive
    cached: bool = False

    @property
    def table_path(self) -> Path:
        return self.train_path


def partition_key(score_key: str, rho: float) -> str:
    return content_hash({"version": PARTITION_VERSION, "score": score_key, "rho": repr(float(rho))})


def _shard_scores(score_dir: Path, n_shards: int) -> Iterator[np.ndarray]:
    for i in range(n_shards):
        col = pq.read_table(score_dir / shard_name(i), columns=["score"]).column("score")
        yield pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def _classes(scores: np.ndarray, tau: np.float32, ties_left: int) -> tuple[np.ndarray, int]:
    """One shard's classes under the global threshold; the first ``ties_left`` ties are positive."""
    out = np.where(scores > tau, POSITIVE, NEGATIVE).astype(np.int8)
    if ties_left > 0:
        ties = np.flatnonzero(scores == tau)[:ties_left]
        out[ties] = POSITIVE
        ties_left -= ties.size
    return out, ties_left


def _validate_shards(score_dir: Path, n_shards: int, size: int, ids: list[str], n_resp: np.ndarray,
                     table_path: Path) -> tuple[float, float]:
    """Pass 0: every shard aligned with its table rows and finite. Returns (min, max) score."""
    lo_all, hi_all = np.inf, -np.inf
    for i in range(n_shards):
        path = score_dir / shard_name(i)
        try:
            t = pq.read_table(path, columns=["sample_id", "score"])
        except Exception as e:
            raise PartitionInputError(f"cannot read score shard {path}: {e}") from None
        lo, hi = i * size, min((i + 1) * size, len(ids))
        if t.column("sample_id").to_pylist() != ids[lo:hi]:
            raise PartitionInputError(f"score shard {path} does not hold table rows {lo}..{hi - 1} in order")
        counts = pc.list_value_length(t.column("score")).to_numpy(zero_copy_only=False)
        if not np.array_equal(counts, n_resp[lo:hi]):
            j = int(np.flatnonzero(counts != n_resp[lo:hi])[0])
            raise PartitionInputError(
                f"score shard {path}: sample_id {ids[lo + j]} has {counts[j]} scores but "
                f"{n_resp[lo + j]} response tokens"
            )
        bad = find_nonfinite(t)
        if bad is not None:
            raise nonfinite_error(table_path, path, *bad)
        flat = pc.list_flatten(t.column("score")).to_numpy(zero_copy_only=False)
        if flat.size:
            lo_all, hi_all = min(lo_all, float(flat.min())), max(hi_all, float(flat.max()))
    return lo_all, hi_all


def run_partition(cfg: PipelineConfig, train_table: Path, score_dir: Path) -> PartitionResult:
    """Write ``<run_dir>/partition/<key>/{train.parquet, partition.json, score_histogram.png}``."""
    from ..report.plots import score_histogram

    rho = cfg.selection.rho
    score_dir, train_table = Path(score_dir), Path(train_table).resolve()

    # 1. inputs -------------------------------------------------------------------------------
    if not is_complete(score_dir):
        raise PartitionInputError(f"score set {score_dir} is not complete (no completion marker): run the score stage")
    info = read_done(score_dir)
    key = partition_key(info["key"], rho)
    out = stage_dir(cfg.run_dir, STAGE, key)
    result_paths = dict(train_path=out / TABLE_FILE, info_path=out / INFO_FILE, histogram_path=out / HISTOGRAM_FILE)
    if is_complete(out):
        done = read_done(out)
        log.info("partition: reusing %s", out)
        return PartitionResult(out, key, **result_paths, n_tokens=done["n_tokens"], n_positive=done["n_positive"],
                               n_negative=done["n_negative"], threshold=done["threshold"], cached=True)
    try:
        table = read_token_table(train_table)
    except TokenTableError as e:
        raise PartitionInputError(str(e)) from None
    if token_table_hash(table) != info["table_hash"]:
        raise PartitionInputError(
            f"score set {score_dir} was computed for a different token table than {train_table} "
            f"(content hash {info['table_hash']} vs {token_table_hash(table)})"
        )
    ids = table.column("sample_id").to_pylist()
    n_resp = table.column("n_response").to_numpy()
    size, n_shards = int(info["shard_size"]), int(info["n_shards"])
    if int(n_resp.sum()) == 0:
        raise PartitionInputError(f"token table {train_table} has no response tokens to partition")

    # 2. validate + histogram range, then the exact threshold -----------------------------------------
    s_min, s_max = _validate_shards(score_dir, n_shards, size, ids, n_resp, train_table)
    th: Threshold = find_threshold(lambda: _shard_scores(score_dir, n_shards), rho)
    edges = np.linspace(s_min, s_max if s_max > s_min else s_min + 1.0, cfg.selection.histogram_bins + 1)
    hist = np.zeros(cfg.selection.histogram_bins, dtype=np.int64)

    # 3. apply it, streaming the partitioned table -------------------------------------------------
    sources = pc.dictionary_encode(table.column("source")).combine_chunks()
    src_names = sources.dictionary.to_pylist()
    src_codes = sources.indices.to_numpy(zero_copy_only=False)
    pos_by_src = np.zeros(len(src_names), dtype=np.int64)
    tok_by_src = np.zeros(len(src_names), dtype=np.int64)
    out_schema = table.schema.append(pa.field("token_class", pa.list_(pa.int8())))
    tau, ties_left, n_pos = np.float32(th.tau), th.ties_positive, 0
    with atomic_dir(out, overwrite=True) as tmp:
        with pq.ParquetWriter(tmp / TABLE_FILE, out_schema) as writer:
            for i, scores in enumerate(_shard_scores(score_dir, n_shards)):
                lo, hi = i * size, min((i + 1) * size, len(ids))
                cls, ties_left = _classes(scores, tau, ties_left)
                n_pos += int((cls == POSITIVE).sum())
                hist += np.histogram(scores, bins=edges)[0]
                tok_src = np.repeat(src_codes[lo:hi], n_resp[lo:hi])
                np.add.at(pos_by_src, tok_src[cls == POSITIVE], 1)
                np.add.at(tok_by_src, tok_src, 1)
                rows = table.slice(lo, hi - lo)
                labels = rows.column("labels").combine_chunks()
                flat = pc.list_flatten(labels).to_numpy(zero_copy_only=False)
                token_class = np.zeros(flat.size, dtype=np.int8)
                token_class[flat != IGNORE_INDEX] = cls  # response positions in row order, as the scores
                offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(labels).to_numpy(zero_copy_only=False))])
                col = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(token_class, pa.int8()))
                writer.write_table(rows.append_column(out_schema.field("token_class"), pa.chunked_array([col])))
        if n_pos != th.k:
            raise RuntimeError(f"partition: {n_pos} positives written, expected floor(N*rho) = {th.k}")
        per_source = {
            name: {"n_tokens": int(tok_by_src[j]), "n_positive": int(pos_by_src[j]),
                   "fraction_positive": float(pos_by_src[j] / tok_by_src[j]) if tok_by_src[j] else None}
            for j, name in enumerate(src_names)
        }
        summary = {
            "stage": STAGE,
            "key": key,
            "score_key": info["key"],
            "score_dir": str(score_dir),
            "train_table": str(train_table),
            "rho": rho,
            "N": th.n,
            "n_samples": len(ids),
            "n_positive": th.k,
            "n_negative": th.n - th.k,
            "threshold": th.tau if np.isfinite(th.tau) else None,  # None: rho so small that k = 0
            "n_above_threshold": th.n_above,
            "ties_positive": th.ties_positive,
            "fraction_positive": th.k / th.n,
            "fraction_positive_by_source": per_source,
            "score_min": s_min,
            "score_max": s_max,
            "histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
        }
        atomic_write_json(tmp / INFO_FILE, summary)
        score_histogram(hist, edges, th.tau, tmp / HISTOGRAM_FILE, rho=rho, n_positive=th.k, n_total=th.n)
        mark_complete(tmp, {"stage": STAGE, "key": key, "n_tokens": th.n, "n_positive": th.k,
                            "n_negative": th.n - th.k, "threshold": summary["threshold"]})
    log.info("partition: %d of %d response tokens positive (rho=%g, threshold %.6g) -> %s",
             th.k, th.n, rho, th.tau, out)
    return PartitionResult(out, key, **result_paths, n_tokens=th.n, n_positive=th.k, n_negative=th.n - th.k,
                           threshold=summary["threshold"])
