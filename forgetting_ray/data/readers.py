"""Corpus readers: jsonl, json, parquet and the FLAN CoT tsv layout -> normalised :class:`Record`s.

Every record keeps where it came from (``file:line`` or ``file row N``) so that any later error can
point at the offending input, and its identity is a hash of its normalised content rather than its
row number (docs/method.md §11 item 3), so reordering or filtering files never changes a sample's id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from ..config import DataConfig, DatasetSpec
from ..store import content_hash
from .sources import DataError, DatasetSource, FileSource, Source, dataset_rows, resolve_sources

Schema = Literal["messages", "prompt_completion"]
CorpusEntry = str | Path | DatasetSpec | dict[str, Any]
ROLES = ("system", "user", "assistant")
SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".tsv": "flan_cot_tsv",
}
# Some exported corpora (e.g. the Dolly subset) spell the end of a response as a literal marker; the
# renderer appends the tokenizer's real EOS, so the marker is removed rather than trained on as text.
EOS_MARKERS = ("###eos_token###",)
FLAN_COT_PROMPT = "{question}\nLet's think step by step."
FLAN_COT_RESPONSE = "{rationale} So the answer is {answer}."


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Record:
    """One normalised sample.

    For ``prompt_completion`` records ``messages`` is ``(user=prompt, assistant=completion)`` with
    the raw strings kept: the Tulu rule joins them depending on their boundary whitespace.
    """

    schema: Schema
    messages: tuple[Message, ...]
    source: str
    origin: str

    @property
    def sample_id(self) -> str:
        return content_hash(self.canonical())

    def canonical(self) -> dict[str, Any]:
        # source and origin are deliberately left out: the same text from two files is one sample.
        return {"schema": self.schema, "messages": [[m.role, m.content] for m in self.messages]}

    @property
    def response_is_empty(self) -> bool:
        return not any(m.content.strip() for m in self.messages if m.role == "assistant")

    def as_chat(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content.strip()} for m in self.messages]


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def resolve_inputs(entries: Iterable[CorpusEntry]) -> list[Source]:
    """Config entries (files, globs, folders, dataset folders, ``hf://datasets/...``, mappings) -> sources."""
    return resolve_sources(entries, SUFFIX_FORMATS)


def resolve_files(patterns: Iterable[str]) -> list[Path]:
    """Local files only (globs and folders expanded, sorted); a dataset entry is an error here."""
    sources = resolve_inputs(patterns)
    datasets = [s.label for s in sources if not isinstance(s, FileSource)]
    if datasets:
        raise DataError(f"expected local files, got dataset(s) {datasets}")
    return [s.path for s in sources]  # type: ignore[union-attr]


def file_format(path: Path, configured: str = "auto") -> str:
    if configured != "auto":
        return configured
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: cannot tell the format from suffix {path.suffix!r}; set data.format")
    return fmt


# ------------------------------------------------------------------------------------------------
# raw readers: yield (origin, dict)
# ------------------------------------------------------------------------------------------------
def _decode_line(path: Path, lineno: int, offset: int, raw: bytes, error: type[Exception]) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(
            f"{path}:{lineno}: not valid UTF-8 (byte offset {offset + e.start} in the file: {e.reason})"
        ) from None


def _iter_lines(path: Path, error: type[Exception] = DataError) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded text without the newline); decoding errors name the byte offset."""
    offset = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            body = raw[3:] if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else raw
            start = offset + (len(raw) - len(body))
            yield lineno, _decode_line(path, lineno, start, body, error).rstrip("\r\n")
            offset += len(raw)


def iter_jsonl(path: Path, error: type[Exception] = DataError) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed object) per non-blank line; bad UTF-8 or JSON raises ``error``
    naming the file and line (callers outside the corpus readers pass their own error class)."""
    for lineno, line in _iter_lines(path, error):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        yield lineno, obj


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    return ((f"{path}:{lineno}", obj) for lineno, obj in iter_jsonl(path))


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte offset {e.start}: {e.reason})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{path}: a .json corpus must be a list of records or {{\"data\": [...]}}")
    for i, rec in enumerate(obj):
        yield f"{path} record {i}", rec


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read parquet: {e}") from None
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            yield f"{path} row {row}", rec
            row += 1


def _read_flan_cot_tsv(path: Path, schema: str) -> Iterator[tuple[str, Any]]:
    for lineno, line in _iter_lines(path):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise DataError(
                f"{path}:{lineno}: expected 3 tab-separated fields (question, answer, rationale), "
                f"got {len(fields)}"
            )
        question, answer, rationale = (f.replace("\\n", "\n").strip() for f in fields)
        prompt = FLAN_COT_PROMPT.format(question=question)
        response = FLAN_COT_RESPONSE.format(rationale=rationale, answer=answer).strip()
        if schema == "prompt_completion":
            yield f"{path}:{lineno}", {"prompt": prompt, "completion": response}
        else:
            # Tulu stores its FLAN CoT share as messages, so chat templates see a real user turn.
            yield f"{path}:{lineno}", {"messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]}


def iter_raw(path: Path, cfg: DataConfig) -> Iterator[tuple[str, Any]]:
    fmt = file_format(path, cfg.format)
    if fmt == "jsonl":
        return _read_jsonl(path)
    if fmt == "json":
        return _read_json(path)
    if fmt == "parquet":
        return _read_parquet(path)
    return _read_flan_cot_tsv(path, cfg.schema_)


# ------------------------------------------------------------------------------------------------
# normalisation
# ------------------------------------------------------------------------------------------------
def _strip_eos_marker(text: str) -> str:
    stripped = text.rstrip()
    for marker in EOS_MARKERS:
        if stripped.endswith(marker):
            return stripped[: -len(marker)]
    return text


def _apply_column_map(rec: dict[str, Any], column_map: dict[str, str], origin: str) -> dict[str, Any]:
    if not column_map:
        return rec
    out = {k: v for k, v in rec.items() if k not in column_map}
    for src, dst in column_map.items():
        if src not in rec:
            continue
        if dst in out:
            raise DataError(f"{origin}: column_map renames {src!r} to {dst!r}, but the record has both")
        out[dst] = rec[src]
    return out


def _detect_schema(rec: dict[str, Any], configured: str, origin: str) -> Schema:
    if configured != "auto":
        return configured  # type: ignore[return-value]
    if "messages" in rec:
        return "messages"
    if "prompt" in rec or "completion" in rec:
        return "prompt_completion"
    raise DataError(
        f"{origin}: cannot tell the schema: expected a 'messages' field or 'prompt'/'completion' "
        f"fields, found {sorted(rec)} (use data.column_map to rename columns)"
    )


def _string_field(rec: dict[str, Any], name: str, origin: str) -> str:
    if name not in rec or rec[name] is None:
        raise DataError(f"{origin}: missing field {name!r}")
    value = rec[name]
    if not isinstance(value, str):
        raise DataError(f"{origin}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _messages(rec: dict[str, Any], origin: str) -> tuple[Message, ...]:
    raw = rec.get("messages")
    if raw is None:
        raise DataError(f"{origin}: missing field 'messages'")
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{origin}: field 'messages' must be a non-empty list")
    out: list[Message] = []
    for i, m in enumerate(raw):
        where = f"{origin}: messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where} must be an object with 'role' and 'content'")
        role = m.get("role")
        if not isinstance(role, str) or role.strip().lower() not in ROLES:
            raise DataError(f"{where}.role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = m.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}.content must be a string, got {type(content).__name__}")
        role = role.strip().lower()
        if role == "assistant":
            content = _strip_eos_marker(content)
        # Tulu strips every turn, and stripped content makes the id immune to stray whitespace.
        out.append(Message(role, content.strip()))
    if not any(m.role == "assistant" for m in out):
        raise DataError(f"{origin}: missing response: 'messages' has no assistant message")
    return tuple(out)


def normalize_record(rec: Any, cfg: DataConfig, *, default_source: str, origin: str) -> Record:
    if not isinstance(rec, dict):
        raise DataError(f"{origin}: a record must be a JSON object, got {type(rec).__name__}")
    rec = _apply_column_map(rec, cfg.column_map, origin)
    schema = _detect_schema(rec, cfg.schema_, origin)
    if schema == "messages":
        messages = _messages(rec, origin)
    else:
        prompt = _string_field(rec, "prompt", origin)
        completion = _strip_eos_marker(_string_field(rec, "completion", origin))
        messages = (Message("user", prompt), Message("assistant", completion))
    source = rec.get(cfg.source_field)
    if not isinstance(source, str) or not source.strip():
        source = default_source
    return Record(schema=schema, messages=messages, source=source.strip(), origin=origin)


def _source_rows(source: Source | Path, cfg: DataConfig) -> tuple[Iterator[tuple[str, Any]], str, str]:
    if isinstance(source, DatasetSource):
        return dataset_rows(source), source.default_source, source.label
    path = source.path if isinstance(source, FileSource) else Path(source)
    return iter_raw(path, cfg), path.stem, str(path)


def read_records(sources: Iterable[Source | Path], cfg: DataConfig, limit: int | None = None) -> Iterator[Record]:
    """Normalised records of ``sources`` (sources or file paths) in order; stops after ``limit`` records.

    A source that yields no record at all (an empty file, only blank lines, an empty split) is an error
    naming it: it is nearly always a wrong path or an unfinished export, not an intended no-op.
    """
    if limit is not None and limit <= 0:
        return
    n = 0
    for source in sources:
        rows, default_source, label = _source_rows(source, cfg)
        before = n
        for origin, raw in rows:
            yield normalize_record(raw, cfg, default_source=default_source, origin=origin)
            n += 1
            if limit is not None and n >= limit:
                return
        if n == before:
            what = "the split holds no rows" if isinstance(source, DatasetSource) else \
                "the file is empty or holds only blank lines"
            raise DataError(f"{label}: no records ({what})")
