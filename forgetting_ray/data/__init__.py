"""Data layer: corpus sources and readers, rendering/masking, the canonical token table, the score-set format."""

from .readers import DataError, Message, Record, file_format, normalize_record, read_records, resolve_files
from .render import IGNORE_INDEX, Rendered, Renderer, RenderError, resolve_template
from .table import (
    TOKEN_TABLE_SCHEMA,
    TokenTableError,
    check_token_table,
    read_token_table,
    rows_to_table,
    token_table_hash,
    write_token_table,
)

__all__ = [
    "DataError",
    "IGNORE_INDEX",
    "Message",
    "Record",
    "RenderError",
    "Rendered",
    "Renderer",
    "TOKEN_TABLE_SCHEMA",
    "TokenTableError",
    "check_token_table",
    "file_format",
    "normalize_record",
    "read_records",
    "read_token_table",
    "resolve_files",
    "resolve_template",
    "rows_to_table",
    "token_table_hash",
    "write_token_table",
]
