"""The score set on disk: what the score stage writes and partition, the report, Tune, the noise check and
the benchmarks read.

A score set is a folder ``<run_dir>/score/<key>/`` holding ``layout.json`` (shard size and row count,
fixed when the folder is created), parquet shards ``shard-NNNNN.parquet`` with one row per sample of the
token table, in table order (shard ``i`` holds rows ``[i*size, (i+1)*size)``), each row carrying one float
per response token in ``nll_base``, ``nll_ref`` and ``score``, and the completion marker written last.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import UserError
from ..store import atomic_path, read_done
from .table import IGNORE_INDEX

log = logging.getLogger(__name__)

LAYOUT_FILE = "layout.json"
SCORE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("nll_base", pa.list_(pa.float32())),
        ("nll_ref", pa.list_(pa.float32())),
        ("score", pa.list_(pa.float32())),
    ]
)
SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")


class ScoreValueError(UserError, RuntimeError):
    """A non-finite score; the message names the sample_id and the token position."""


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


def iter_score_shards(score_dir: Path, columns: list[str] | None = None) -> Iterator[tuple[Path, pa.Table]]:
    """(path, table) of every shard of a complete score set, in shard (= table) order."""
    score_dir = Path(score_dir)
    info = read_done(score_dir)
    for i in range(int(info["n_shards"])):
        path = score_dir / shard_name(i)
        yield path, pq.read_table(path, columns=columns)


def check_shard(path: Path, expected_ids: list[str], expected_counts: np.ndarray) -> str | None:
    """None when ``path`` is a complete shard for these rows, else what is wrong with it."""
    try:
        t = pq.read_table(path)
    except Exception as e:  # truncated or garbage files raise several pyarrow error types
        return f"unreadable ({type(e).__name__}: {e})"
    if t.schema != SCORE_SCHEMA:
        return f"schema {t.schema} differs from {SCORE_SCHEMA}"
    if t.column("sample_id").to_pylist() != expected_ids:
        return "its sample_ids differ from the table rows of this shard"
    for col in ("nll_base", "nll_ref", "score"):
        if not np.array_equal(pc.list_value_length(t.column(col)).to_numpy(zero_copy_only=False), expected_counts):
            return f"column {col!r} does not hold one value per response token"
    return None


def existing_shards(out: Path, n_shards: int, ids: list[str], n_resp: np.ndarray, size: int) -> set[int]:
    """Indices of valid finished shards; corrupt ones are removed (with a warning) to be rescored."""
    done: set[int] = set()
    for stale in out.glob(".shard-*.tmp-*"):  # temp files of a killed writer
        stale.unlink(missing_ok=True)
    for f in sorted(out.glob("shard-*.parquet")):
        m = SHARD_RE.match(f.name)
        i = int(m.group(1)) if m else -1
        if not 0 <= i < n_shards:
            warnings.warn(f"score: {f} is not a shard of this layout; removing it", stacklevel=2)
            f.unlink()
            continue
        lo, hi = i * size, min((i + 1) * size, len(ids))
        problem = check_shard(f, ids[lo:hi], n_resp[lo:hi])
        if problem:
            msg = f"score: shard {f} is corrupt or incomplete ({problem}); it will be rescored"
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
            f.unlink()
            continue
        done.add(i)
    return done


def write_shard(out: Path, i: int, parts: list[pa.Table], index: dict[str, int], ids: list[str],
                n_resp: np.ndarray, size: int, table_path: Path) -> Path:
    """Write shard ``i`` of the score set in ``out`` (temp file + rename) from the rows gathered for it.

    ``parts`` may come in any order and repeat rows (a retried batch) or carry extra columns (the scorer's
    bookkeeping): the shard keeps one row per sample, in table order, and the score-set columns only.
    ``index`` maps a sample_id to its table row; ``ids`` and ``n_resp`` are the table's sample_ids and
    response-token counts, which the shard must match.  A NaN/inf score is a :class:`ScoreValueError`.
    """
    t = pa.concat_tables(parts)
    local = np.fromiter((index[x] - i * size for x in t.column("sample_id").to_pylist()), np.int64,
                        count=t.num_rows)
    _, first = np.unique(local, return_index=True)  # table order, one row per sample
    t = t.take(pa.array(first)).select(SCORE_SCHEMA.names).cast(SCORE_SCHEMA)
    lo, hi = i * size, min((i + 1) * size, len(ids))
    if t.column("sample_id").to_pylist() != ids[lo:hi] or not np.array_equal(
        pc.list_value_length(t.column("score")).to_numpy(zero_copy_only=False), n_resp[lo:hi]
    ):
        raise RuntimeError(f"score: shard {i} came back with rows or token counts that differ from the table")
    bad = find_nonfinite(t)
    path = out / shard_name(i)
    if bad is not None:
        raise nonfinite_error(table_path, path, *bad)
    with atomic_path(path) as tmp:
        pq.write_table(t, tmp)
    return path


def find_nonfinite(scores: pa.Table) -> tuple[str, int, float] | None:
    """(sample_id, index among the row's response tokens, value) of the first NaN/inf score."""
    col = scores.column("score")
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~np.isfinite(flat))
    if bad.size == 0:
        return None
    parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
    row = int(parents[bad[0]])
    first_of_row = int(np.flatnonzero(parents == row)[0])
    return scores.column("sample_id")[row].as_py(), int(bad[0]) - first_of_row, float(flat[bad[0]])


def nonfinite_error(table_path: Path, shard: Path | str, sid: str, resp_idx: int, value: float) -> ScoreValueError:
    """The error for a NaN/inf score, naming the sample and the token's position in the token table."""
    row = pq.read_table(table_path, columns=["labels"], filters=[("sample_id", "=", sid)])
    labels = np.asarray(row.column("labels")[0].as_py()) if row.num_rows else np.zeros(0)
    positions = np.flatnonzero(labels != IGNORE_INDEX)
    pos = int(positions[resp_idx]) if resp_idx < positions.size else -1
    return ScoreValueError(
        f"non-finite score {value} for sample_id {sid} at token position {pos} (response token #{resp_idx}) "
        f"in {shard}; base or reference produced NaN/inf -- check the models and the dtype"
    )
