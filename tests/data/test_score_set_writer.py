"""Writing a score-set shard (data/score_set.write_shard) from rows gathered in any order: no cluster."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forgetting_ray.data.score_set import SCORE_SCHEMA, ScoreValueError, check_shard, shard_name, write_shard

IDS = [f"s{k}" for k in range(6)]
N_RESP = np.array([2, 1, 3, 2, 1, 2])


def scored_rows(rows: list[int], *, value: float = 0.5) -> pa.Table:
    """Rows as a scorer returns them: the score-set columns plus per-row bookkeeping."""
    vals = [[value] * int(N_RESP[r]) for r in rows]
    f32 = pa.list_(pa.float32())
    return pa.table({"sample_id": [IDS[r] for r in rows], "nll_base": pa.array(vals, f32),
                     "nll_ref": pa.array(vals, f32), "score": pa.array(vals, f32),
                     "_padded_len": pa.array([8] * len(rows), pa.int32())})


def test_shard_keeps_one_row_per_sample_in_table_order(tmp_path):
    index = {sid: i for i, sid in enumerate(IDS)}
    parts = [scored_rows([5, 3]), scored_rows([4, 3])]  # shard 1 of size 3, out of order, row 3 twice
    path = write_shard(tmp_path, 1, parts, index, IDS, N_RESP, 3, tmp_path / "unused.parquet")
    assert path == tmp_path / shard_name(1)
    t = pq.read_table(path)
    assert t.schema == SCORE_SCHEMA and t.column("sample_id").to_pylist() == IDS[3:6]
    assert check_shard(path, IDS[3:6], N_RESP[3:6]) is None
    assert [p.name for p in tmp_path.iterdir()] == [shard_name(1)]  # no temp file left behind


def test_missing_rows_and_nonfinite_scores_write_nothing(tmp_path):
    index = {sid: i for i, sid in enumerate(IDS)}
    with pytest.raises(RuntimeError, match="shard 0 came back with rows"):
        write_shard(tmp_path, 0, [scored_rows([0, 2])], index, IDS, N_RESP, 3, tmp_path / "unused.parquet")
    table = tmp_path / "table.parquet"  # the columns the error message reads
    pq.write_table(pa.table({"sample_id": IDS, "labels": [[-100] * (4 - int(n)) + [7] * int(n) for n in N_RESP]}),
                   table)
    with pytest.raises(ScoreValueError, match="sample_id s0 at token position 2 "):
        write_shard(tmp_path, 0, [scored_rows([0, 1, 2], value=float("nan"))], index, IDS, N_RESP, 3, table)
    assert not list(tmp_path.glob("shard-*"))
