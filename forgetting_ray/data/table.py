"""The canonical token table: one tokenization that every later stage reads (docs/method.md §11 item 2, §12).

Parquet schema (exact; other stages rely on it):
``sample_id`` string · ``source`` string · ``input_ids`` list<int32> · ``labels`` list<int32>
(-100 outside assistant spans, else equal to ``input_ids``) · ``length`` int32 · ``n_response`` int32.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..constants import IGNORE_INDEX
from ..errors import UserError
from ..store import atomic_path

TOKEN_TABLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("length", pa.int32()),
        ("n_response", pa.int32()),
    ]
)
_SAMPLE_ID = re.compile(r"^[0-9a-f]{16}$")


class TokenTableError(UserError, ValueError):
    """A malformed token table; the message names the file (or origin) and the column."""


def _flat(col: pa.ChunkedArray) -> np.ndarray:
    return pc.list_flatten(col).to_numpy(zero_copy_only=False)


def _row_counts(col: pa.ChunkedArray, mask: np.ndarray, n_rows: int) -> np.ndarray:
    parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
    return np.bincount(parents[mask], minlength=n_rows)


def _fail(origin: str, column: str, problem: str) -> None:
    raise TokenTableError(f"{origin}: token table column {column!r}: {problem}")


def check_token_table(table: pa.Table, origin: str = "<table>", *, allow_extra: bool = False) -> None:
    """Raise :class:`TokenTableError` naming ``origin`` and the column when ``table`` is malformed."""
    for field in TOKEN_TABLE_SCHEMA:
        if field.name not in table.column_names:
            _fail(origin, field.name, "missing")
        got = table.schema.field(field.name).type
        if got != field.type:
            _fail(origin, field.name, f"type {got}, expected {field.type}")
        if table.column(field.name).null_count:
            _fail(origin, field.name, "has null values")
    extra = [c for c in table.column_names if c not in TOKEN_TABLE_SCHEMA.names]
    if extra and not allow_extra:
        _fail(origin, extra[0], "unexpected column")
    n = table.num_rows
    ids, labels = table.column("input_ids"), table.column("labels")
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
    if not np.array_equal(lengths, pc.list_value_length(labels).to_numpy(zero_copy_only=False)):
        _fail(origin, "labels", "a row's labels differ in length from its input_ids")
    if not np.array_equal(lengths, table.column("length").to_numpy()):
        _fail(origin, "length", "does not equal len(input_ids)")
    flat_ids, flat_labels = _flat(ids), _flat(labels)
    trainable = flat_labels != IGNORE_INDEX
    if not np.array_equal(flat_labels[trainable], flat_ids[trainable]):
        _fail(origin, "labels", "a label other than -100 differs from the input id at its position")
    if not np.array_equal(_row_counts(labels, trainable, n), table.column("n_response").to_numpy()):
        _fail(origin, "n_response", "does not equal the count of labels != -100")
    ids_col = table.column("sample_id").to_pylist()
    bad = next((s for s in ids_col if not _SAMPLE_ID.match(s)), None)
    if bad is not None:
        _fail(origin, "sample_id", f"{bad!r} is not 16 lowercase hex characters")
    if len(set(ids_col)) != n:
        _fail(origin, "sample_id", "has duplicate values")


def rows_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows with sample_id, source, input_ids, labels (length and n_response are derived)."""
    cols: dict[str, list[Any]] = {name: [] for name in TOKEN_TABLE_SCHEMA.names}
    for r in rows:
        ids, labels = list(r["input_ids"]), list(r["labels"])
        cols["sample_id"].append(r["sample_id"])
        cols["source"].append(r["source"])
        cols["input_ids"].append(ids)
        cols["labels"].append(labels)
        cols["length"].append(len(ids))
        cols["n_response"].append(sum(1 for x in labels if x != IGNORE_INDEX))
    return pa.Table.from_pydict(cols, schema=TOKEN_TABLE_SCHEMA)


def write_token_table(rows_or_table: pa.Table | Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Check and write a token table; the file appears only complete (temporary file + rename)."""
    table = rows_or_table if isinstance(rows_or_table, pa.Table) else rows_to_table(rows_or_table)
    if sorted(table.column_names) == sorted(TOKEN_TABLE_SCHEMA.names):
        table = table.select(TOKEN_TABLE_SCHEMA.names)  # canonical column order on disk
    check_token_table(table, str(path))
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_token_table(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise TokenTableError(f"{path}: token table not found")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise TokenTableError(f"{path}: cannot read token table: {e}") from None
    check_token_table(table, str(path))
    return table


def token_table_hash(table: pa.Table) -> str:
    """Content hash of the rows in order (ids, sources, tokens, labels), independent of parquet bytes."""
    h = hashlib.sha256()
    for name in ("sample_id", "source"):
        h.update("\x00".join(table.column(name).to_pylist()).encode())
        h.update(b"\x01")
    h.update(table.column("length").to_numpy().astype("<i4").tobytes())
    for name in ("input_ids", "labels"):
        h.update(_flat(table.column(name)).astype("<i4").tobytes())
    return h.hexdigest()[:16]
