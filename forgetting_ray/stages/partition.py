"""PARTITION stage: exact global top-rho split of the response-token scores (docs/method.md §5).

Recipe, top to bottom (``run_partition``):

1. ``_finished_score_set``: the score set must carry its completion marker;
2. key the output by (score key, rho); a finished partition is reused as it is;
3. ``_read_layout``: the token table must be the one the scores were computed for (content hash);
4. ``_validate_shards`` (pass 0): every shard aligned with its table rows and finite; gathers the
   histogram range;
5. ``selection.find_threshold``: the exact k-th largest score, in two streaming passes;
6. ``_write_partitioned_table`` (last pass): applies the threshold shard by shard (ties go to the lower
   global index, as ``selection.partition``) and streams the partitioned table, the histogram and the
   per-source counts;
7. ``partition.json``, ``score_histogram.png`` and the completion marker, written in the same temporary
   folder as ``train.parquet`` so that all of them appear together.

Only one shard of scores is in memory at a time; the token table is read once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import PipelineConfig, SelectionConfig
from ..data.score_set import find_nonfinite, nonfinite_error, shard_name
from ..data.table import IGNORE_INDEX, TokenTableError, read_token_table, token_table_hash
from ..errors import UserError
from ..report.plots import score_histogram
from ..selection import (
    NEGATIVE,
    POSITIVE,
    Threshold,
    bottom_threshold,
    classify_shard,
    find_threshold,
    three_way,
    variant_scores,
)
from ..store import atomic_dir, atomic_write_json, content_hash, is_complete, mark_complete, read_done, stage_dir

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


@dataclass(frozen=True)
class _Layout:
    """The token table and how the score set's shards cut it into rows."""

    table: pa.Table
    ids: list[str]
    n_resp: np.ndarray
    size: int
    n_shards: int

    def rows(self, i: int) -> tuple[int, int]:
        """Table rows ``[lo, hi)`` of shard ``i``."""
        return i * self.size, min((i + 1) * self.size, len(self.ids))


@dataclass
class _Applied:
    """What the last pass counted while writing the partitioned table."""

    n_positive: int
    n_negative: int
    hist: np.ndarray
    per_source: dict[str, dict[str, Any]]
    nll: dict[str, Any]  # the base and reference NLLs behind the split (see _NllStats)


# base-NLL histogram bins of the positives and negatives (nats); the last bin takes everything above
NLL_EDGES = np.concatenate([np.linspace(0.0, 10.0, 101), [np.inf]])
# The reference "barely differs" from the base when its held-out NLL gain is below this share of the base NLL
# and the threshold sits within this share of zero: the split is then close to arbitrary.
BARELY_DIFFERS = 0.02


class _NllStats:
    """Running sums over the training tokens: the reference's held-out NLL gain (the training split is held out
    from the reference), and the base NLL of the positives and of the negatives."""

    def __init__(self) -> None:
        self.n, self.base, self.ref = 0, 0.0, 0.0
        self.hist = {"positive": np.zeros(NLL_EDGES.size - 1, np.int64), "negative": np.zeros(NLL_EDGES.size - 1, np.int64)}

    def add(self, nll_base: np.ndarray, nll_ref: np.ndarray, cls: np.ndarray) -> None:
        self.n += nll_base.size
        self.base += float(nll_base.sum(dtype=np.float64))
        self.ref += float(nll_ref.sum(dtype=np.float64))
        self.hist["positive"] += np.histogram(nll_base[cls == POSITIVE], NLL_EDGES)[0]
        self.hist["negative"] += np.histogram(nll_base[cls == NEGATIVE], NLL_EDGES)[0]

    def summary(self) -> dict[str, Any]:
        base, ref = self.base / max(self.n, 1), self.ref / max(self.n, 1)

        def quantiles(h: np.ndarray) -> dict[str, float] | None:
            if not h.sum():
                return None
            c = np.cumsum(h) / h.sum()
            return {f"p{int(q * 100)}": float(NLL_EDGES[min(int(np.searchsorted(c, q)) + 1, NLL_EDGES.size - 2)])
                    for q in (0.1, 0.5, 0.9)}

        return {"mean_nll_base": base, "mean_nll_ref": ref, "heldout_gain": base - ref,
                "heldout_gain_relative": (base - ref) / base if base > 0 else None,
                "base_nll_quantiles": {k: quantiles(h) for k, h in self.hist.items()},
                "base_nll_histogram": {"edges": NLL_EDGES[:-1].tolist(), **{k: h.tolist() for k, h in self.hist.items()}}}


def reference_barely_differs(nll: dict[str, Any], threshold: float | None) -> bool:
    """The reference's held-out gain is tiny and the threshold near zero: the negatives are near arbitrary."""
    rel = nll.get("heldout_gain_relative")
    if rel is None or threshold is None:
        return False
    return abs(rel) < BARELY_DIFFERS and abs(threshold) < BARELY_DIFFERS * nll["mean_nll_base"]


def selection_options(sel: SelectionConfig) -> dict[str, Any]:
    """The selection settings beyond rho that change the split, where they differ from the paper's."""
    opts = {"score": sel.score, "negative_fraction": sel.negative_fraction, "negative_margin": sel.negative_margin,
            "base_nll_floor": sel.base_nll_floor}
    default = {"score": "difference", "negative_fraction": None, "negative_margin": None, "base_nll_floor": None}
    return {k: v for k, v in opts.items() if v != default[k]}


def partition_key(score_key: str, rho: float, options: dict[str, Any] | None = None) -> str:
    """The split's identity: the scores, rho and any non-default selection option (the paper's split keeps the
    key it always had)."""
    key = {"version": PARTITION_VERSION, "score": score_key, "rho": repr(float(rho))}
    return content_hash({**key, "options": options} if options else key)


def _result(out: Path, key: str, marker: dict[str, Any], *, cached: bool = False) -> PartitionResult:
    return PartitionResult(out, key, train_path=out / TABLE_FILE, info_path=out / INFO_FILE,
                           histogram_path=out / HISTOGRAM_FILE, n_tokens=marker["n_tokens"],
                           n_positive=marker["n_positive"], n_negative=marker["n_negative"],
                           threshold=marker["threshold"], cached=cached)


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def _finished_score_set(score_dir: Path) -> dict[str, Any]:
    """The score set's completion marker (its key, shard layout and table hash)."""
    if not is_complete(score_dir):
        raise PartitionInputError(f"score set {score_dir} is not complete (no completion marker): run the score stage")
    return read_done(score_dir)


def _read_layout(train_table: Path, score_dir: Path, info: dict[str, Any]) -> _Layout:
    """The token table, refused unless it is the one the score set was computed for."""
    try:
        table = read_token_table(train_table)
    except TokenTableError as e:
        raise PartitionInputError(str(e)) from None
    if token_table_hash(table) != info["table_hash"]:
        raise PartitionInputError(
            f"score set {score_dir} was computed for a different token table than {train_table} "
            f"(content hash {info['table_hash']} vs {token_table_hash(table)})"
        )
    layout = _Layout(table, table.column("sample_id").to_pylist(), table.column("n_response").to_numpy(),
                     int(info["shard_size"]), int(info["n_shards"]))
    if int(layout.n_resp.sum()) == 0:
        raise PartitionInputError(f"token table {train_table} has no response tokens to partition")
    return layout


# ------------------------------------------------------------------------------------------------
# passes over the score shards
# ------------------------------------------------------------------------------------------------
def _flat(t: pa.Table, name: str) -> np.ndarray:
    return pc.list_flatten(t.column(name)).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def _shard_columns(score_dir: Path, n_shards: int, variant: str) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ranking score, NLL base, NLL reference) of each shard's response tokens; the ranking score is the stored
    one for the paper's 'difference', else the variant computed from the stored NLLs."""
    for i in range(n_shards):
        t = pq.read_table(score_dir / shard_name(i), columns=["score", "nll_base", "nll_ref"])
        base, ref = _flat(t, "nll_base"), _flat(t, "nll_ref")
        if variant == "difference":
            score = _flat(t, "score")
        else:
            score = variant_scores(base, ref, pc.list_value_length(t.column("score")).to_numpy(zero_copy_only=False),
                                   variant)
        yield score, base, ref


def _shard_scores(score_dir: Path, n_shards: int, variant: str = "difference") -> Iterator[np.ndarray]:
    for score, _, _ in _shard_columns(score_dir, n_shards, variant):
        yield score


def _validate_shards(score_dir: Path, layout: _Layout, table_path: Path) -> tuple[float, float]:
    """Pass 0: every shard aligned with its table rows and finite. Returns (min, max) score."""
    ids, n_resp = layout.ids, layout.n_resp
    lo_all, hi_all = np.inf, -np.inf
    for i in range(layout.n_shards):
        path = score_dir / shard_name(i)
        try:
            t = pq.read_table(path, columns=["sample_id", "score"])
        except Exception as e:
            raise PartitionInputError(f"cannot read score shard {path}: {e}") from None
        lo, hi = layout.rows(i)
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


def _with_token_class(rows: pa.Table, cls: np.ndarray, class_field: pa.Field) -> pa.Table:
    """``rows`` plus a ``token_class`` list per row: ``cls`` at the response positions, 0 elsewhere."""
    labels = rows.column("labels").combine_chunks()
    flat = pc.list_flatten(labels).to_numpy(zero_copy_only=False)
    token_class = np.zeros(flat.size, dtype=np.int8)
    token_class[flat != IGNORE_INDEX] = cls  # response positions in row order, as the scores
    offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(labels).to_numpy(zero_copy_only=False))])
    col = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(token_class, pa.int8()))
    return rows.append_column(class_field, pa.chunked_array([col]))


def _write_partitioned_table(path: Path, score_dir: Path, layout: _Layout, th: Threshold, edges: np.ndarray,
                             sel: SelectionConfig, negative_at_most: float | None) -> _Applied:
    """Last pass: classify each shard under the global threshold (then leave out the tokens the three-way split
    and the base-NLL floor exclude) and stream its rows, with token_class, to ``path``."""
    table = layout.table
    sources = pc.dictionary_encode(table.column("source")).combine_chunks()
    src_names = sources.dictionary.to_pylist()
    src_codes = sources.indices.to_numpy(zero_copy_only=False)
    pos_by_src = np.zeros(len(src_names), dtype=np.int64)
    tok_by_src = np.zeros(len(src_names), dtype=np.int64)
    hist = np.zeros(len(edges) - 1, dtype=np.int64)
    out_schema = table.schema.append(pa.field("token_class", pa.list_(pa.int8())))
    tau, ties_left, n_pos, n_neg, nll = np.float32(th.tau), th.ties_positive, 0, 0, _NllStats()
    with pq.ParquetWriter(path, out_schema) as writer:
        for i, (scores, nll_base, nll_ref) in enumerate(_shard_columns(score_dir, layout.n_shards, sel.score)):
            lo, hi = layout.rows(i)
            cls, ties_left = classify_shard(scores, tau, ties_left)
            cls = three_way(cls, scores, negative_at_most=negative_at_most, nll_base=nll_base,
                            base_nll_floor=sel.base_nll_floor)
            n_pos += int((cls == POSITIVE).sum())
            n_neg += int((cls == NEGATIVE).sum())
            nll.add(nll_base, nll_ref, cls)
            hist += np.histogram(scores, bins=edges)[0]
            tok_src = np.repeat(src_codes[lo:hi], layout.n_resp[lo:hi])
            np.add.at(pos_by_src, tok_src[cls == POSITIVE], 1)
            np.add.at(tok_by_src, tok_src, 1)
            writer.write_table(_with_token_class(table.slice(lo, hi - lo), cls, out_schema.field("token_class")))
    per_source = {
        name: {"n_tokens": int(tok_by_src[j]), "n_positive": int(pos_by_src[j]),
               "fraction_positive": float(pos_by_src[j] / tok_by_src[j]) if tok_by_src[j] else None}
        for j, name in enumerate(src_names)
    }
    return _Applied(n_pos, n_neg, hist, per_source, nll.summary())


# ------------------------------------------------------------------------------------------------
# stage
# ------------------------------------------------------------------------------------------------
def _summary(key: str, info: dict[str, Any], score_dir: Path, train_table: Path, sel: SelectionConfig,
             layout: _Layout, th: Threshold, applied: _Applied, score_range: tuple[float, float],
             edges: np.ndarray) -> dict[str, Any]:
    """The content of ``partition.json``."""
    rho = sel.rho
    threshold = th.tau if np.isfinite(th.tau) else None
    return {
        "stage": STAGE,
        "key": key,
        "score_key": info["key"],
        "score_dir": str(score_dir),
        "train_table": str(train_table),
        "rho": rho,
        "N": th.n,
        "n_samples": len(layout.ids),
        "n_positive": th.k,
        "n_negative": applied.n_negative,
        "n_ignored": th.n - th.k - applied.n_negative,
        "selection": selection_options(sel),
        "threshold": threshold,  # None: rho so small that k = 0
        "n_above_threshold": th.n_above,
        "ties_positive": th.ties_positive,
        "fraction_positive": th.k / th.n,
        "fraction_positive_by_source": applied.per_source,
        "score_min": score_range[0],
        "score_max": score_range[1],
        "histogram": {"edges": edges.tolist(), "counts": applied.hist.tolist()},
        "nll": applied.nll,
        "reference_barely_differs": reference_barely_differs(applied.nll, threshold),
    }


def run_partition(cfg: PipelineConfig, train_table: Path, score_dir: Path) -> PartitionResult:
    """Write ``<run_dir>/partition/<key>/{train.parquet, partition.json, score_histogram.png}``."""
    sel = cfg.selection
    rho = sel.rho
    score_dir, train_table = Path(score_dir), Path(train_table).resolve()

    info = _finished_score_set(score_dir)
    key = partition_key(info["key"], rho, selection_options(sel))
    out = stage_dir(cfg.run_dir, STAGE, key)
    if is_complete(out):
        log.info("partition: reusing %s", out)
        return _result(out, key, read_done(out), cached=True)
    layout = _read_layout(train_table, score_dir, info)

    stored_range = _validate_shards(score_dir, layout, train_table)
    shards = lambda: _shard_scores(score_dir, layout.n_shards, sel.score)  # noqa: E731 - re-read per pass
    # a variant ranks by other numbers than the stored score: one more pass for their range
    s_min, s_max = stored_range if sel.score == "difference" else _score_range(shards())
    th = find_threshold(shards, rho)
    edges = np.linspace(s_min, s_max if s_max > s_min else s_min + 1.0, sel.histogram_bins + 1)
    negative_at_most = _negative_bound(sel, th, shards)

    with atomic_dir(out, overwrite=True) as tmp:
        applied = _write_partitioned_table(tmp / TABLE_FILE, score_dir, layout, th, edges, sel, negative_at_most)
        if applied.n_positive != th.k:
            raise RuntimeError(f"partition: {applied.n_positive} positives written, expected floor(N*rho) = {th.k}")
        summary = _summary(key, info, score_dir, train_table, sel, layout, th, applied, (s_min, s_max), edges)
        atomic_write_json(tmp / INFO_FILE, summary)
        score_histogram(applied.hist, edges, th.tau, tmp / HISTOGRAM_FILE, rho=rho, n_positive=th.k, n_total=th.n)
    marker = {"stage": STAGE, "key": key, "n_tokens": th.n, "n_positive": th.k, "n_negative": applied.n_negative,
              "threshold": summary["threshold"]}
    mark_complete(out, marker)  # after the rename: on object storage the marker must be the last object
    log.info("partition: %d of %d response tokens positive, %d negative (rho=%g, threshold %.6g) -> %s",
             th.k, th.n, applied.n_negative, rho, th.tau, out)
    nll = applied.nll
    if summary["reference_barely_differs"]:
        log.warning("partition: the reference barely differs from the base model (held-out NLL gain %.4f nats, "
                    "%.2f%% of the base's %.3f; threshold %.4g): the negative set is close to arbitrary. Train the "
                    "reference longer, with a higher lr or on more data.", nll["heldout_gain"],
                    100 * nll["heldout_gain_relative"], nll["mean_nll_base"], th.tau)
    return _result(out, key, marker)


def _score_range(scores: Iterator[np.ndarray]) -> tuple[float, float]:
    lo, hi = np.inf, -np.inf
    for s in scores:
        if s.size:
            lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
    return lo, hi


def _negative_bound(sel: SelectionConfig, th: Threshold, shards) -> float | None:
    """The highest score a negative may have under the three-way split (None: every non-positive is negative)."""
    if sel.negative_fraction is not None:
        return bottom_threshold(shards, sel.negative_fraction)
    if sel.negative_margin is not None and np.isfinite(th.tau):
        return float(th.tau) - sel.negative_margin
    return None
