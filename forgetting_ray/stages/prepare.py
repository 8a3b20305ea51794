"""PREPARE stage: corpus files -> token tables for the reference and training sets, plus a manifest.

Reads top to bottom: resolve inputs and the cache key -> read and deduplicate records -> render and
tokenize once -> split off the reference set -> write everything into one folder atomically.
The folder is ``<run_dir>/prepare/<key>/`` and the key hashes everything that changes its bytes, so a
rerun with unchanged inputs is a no-op and a changed input never reuses stale tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from ..config import DataConfig, PipelineConfig, config_to_dict
from ..data.readers import DataError, Record, read_records, resolve_inputs
from ..data.render import Renderer
from ..data.sources import Source
from ..data.table import rows_to_table, token_table_hash, write_token_table
from ..errors import UserError
from ..models import load_tokenizer, portable_model_ref, tokenizer_fingerprint
from ..store import atomic_dir, atomic_write_json, content_hash, is_complete, mark_complete, stage_dir

log = logging.getLogger(__name__)

STAGE = "prepare"
# Bump when rendering or the table layout changes, so old cached folders are not reused.
PREPARE_VERSION = 1
TRAIN_FILE, REFERENCE_FILE, MANIFEST_FILE = "train.parquet", "reference.parquet", "manifest.json"
MAX_DROPS_LISTED = 1000


class PrepareError(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class PrepareResult:
    dir: Path
    train_path: Path
    reference_path: Path
    manifest_path: Path
    key: str
    cached: bool = False  # True when a completed folder was reused

    @classmethod
    def at(cls, folder: Path, key: str, cached: bool) -> "PrepareResult":
        return cls(folder, folder / TRAIN_FILE, folder / REFERENCE_FILE, folder / MANIFEST_FILE, key, cached)

    def read_manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))


@dataclass
class _Row:
    sample_id: str
    source: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool


@dataclass
class _Corpus:
    """Records of one corpus after deduplication, with the counts the manifest reports."""

    name: str
    labels: list[str] = field(default_factory=list)  # the files / datasets it was read from
    records: list[tuple[str, Record]] = field(default_factory=list)
    records_read: int = 0
    duplicates_within: int = 0
    read_per_source: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)

    def counts(self) -> dict[str, Any]:
        return {
            "records_read": self.records_read,
            "duplicates_within_corpus": self.duplicates_within,
            "dropped": dict(sorted(self.dropped.items())),
            "records_read_per_source": dict(sorted(self.read_per_source.items())),
        }


# ------------------------------------------------------------------------------------------------
# key
# ------------------------------------------------------------------------------------------------
def prepare_key(
    file_hashes: dict[str, list[str]], data: DataConfig, fingerprint: str, max_length: int
) -> str:
    return content_hash(
        {
            "version": PREPARE_VERSION,
            "files": file_hashes,  # ordered: file order decides row order and max_samples
            "data": config_to_dict(data),
            "tokenizer": fingerprint,
            "max_length": max_length,
        }
    )


# ------------------------------------------------------------------------------------------------
# reading, rendering, splitting
# ------------------------------------------------------------------------------------------------
def _load_corpus(name: str, files: list[Source], data: DataConfig) -> _Corpus:
    corpus = _Corpus(name, [s.label for s in files])
    seen: set[str] = set()
    for rec in read_records(files, data, limit=data.max_samples):
        corpus.records_read += 1
        corpus.read_per_source[rec.source] += 1
        sid = rec.sample_id
        if sid in seen:
            corpus.duplicates_within += 1
            continue
        seen.add(sid)
        corpus.records.append((sid, rec))
    return corpus


def _render(corpus: _Corpus, renderer: Renderer, drops: list[dict[str, str]]) -> list[_Row]:
    rows: list[_Row] = []
    for sid, rec in corpus.records:
        reason = None
        if rec.response_is_empty:
            reason = "empty_response"
        else:
            r = renderer.render(rec)
            if r.n_response == 0:
                reason = "fully_truncated"  # the prompt alone fills max_length
            else:
                rows.append(_Row(sid, rec.source, r.input_ids, r.labels, r.truncated))
        if reason:
            corpus.dropped[reason] += 1
            if len(drops) < MAX_DROPS_LISTED:
                drops.append({"corpus": corpus.name, "sample_id": sid, "origin": rec.origin, "reason": reason})
            log.warning("prepare: dropped %s (%s)", rec.origin, reason)
    return rows


def split_order(sample_ids: Iterable[str], seed: int) -> list[str]:
    """The ids in a seeded pseudo-random order that depends only on the ids, not on file order."""
    return sorted(sample_ids, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())


def reference_size(n: int, data: DataConfig) -> int:
    if data.reference_count is not None:
        k = data.reference_count
    elif data.reference_fraction is not None:
        k = max(1, round(data.reference_fraction * n))
    else:
        raise PrepareError("set data.reference_fraction, data.reference_count or data.reference_files")
    if k >= n:
        field = (f"data.reference_count={data.reference_count}" if data.reference_count is not None
                 else f"data.reference_fraction={data.reference_fraction}")
        raise PrepareError(
            f"{field}: the reference split needs {k} samples but only {n} usable samples exist; at least one "
            "must stay for training"
        )
    return k


def _nonempty(rows: list[_Row], corpus: _Corpus, what: str) -> None:
    if rows:
        return
    shown = corpus.labels[:3] + ([f"... {len(corpus.labels) - 3} more"] if len(corpus.labels) > 3 else [])
    where = ", ".join(shown) or what
    if corpus.records_read and corpus.dropped.get("empty_response", 0) == sum(corpus.dropped.values()) > 0:
        fix = ("every response is empty: fill the 'completion' field or the assistant messages, or map the "
               "response column onto them with data.column_map")
    else:
        fix = "check the data or raise data.max_length"
    raise PrepareError(
        f"{where}: no response tokens to train on: all {corpus.records_read} records of the {what} were dropped "
        f"or removed (dropped: {dict(corpus.dropped)}, duplicates: {corpus.duplicates_within}); {fix}"
    )


def _set_summary(table: pa.Table, rows: list[_Row]) -> dict[str, Any]:
    sources = table.column("source").to_pylist()
    lengths = table.column("length").to_pylist()
    n_resp = table.column("n_response").to_pylist()
    per_source: dict[str, Counter] = {}
    for src, n, k in zip(sources, lengths, n_resp):
        c = per_source.setdefault(src, Counter())
        c["samples"] += 1
        c["tokens"] += n
        c["response_tokens"] += k
    return {
        "n_samples": table.num_rows,
        "n_tokens": sum(lengths),
        "n_response_tokens": sum(n_resp),
        "truncated": sum(r.truncated for r in rows),
        "content_hash": token_table_hash(table),
        "per_source": {s: dict(c) for s, c in sorted(per_source.items())},
        "sample_ids": table.column("sample_id").to_pylist(),
    }


@dataclass
class _Sets:
    """The two row sets plus what the manifest says about how they were formed."""

    train: list[_Row]
    reference: list[_Row]
    corpora: list[_Corpus]
    split: dict[str, Any]
    across: int = 0  # training samples removed because the reference files hold them too


def _sets_from_reference_files(train: _Corpus, ref_files: list[Source], data: DataConfig, renderer: Renderer,
                               drops: list[dict[str, str]]) -> _Sets:
    ref = _load_corpus("reference", ref_files, data)
    ref_ids = {sid for sid, _ in ref.records}
    kept = [(sid, rec) for sid, rec in train.records if sid not in ref_ids]
    across = len(train.records) - len(kept)  # the reference set stays as given; training gives way
    train.records = kept
    ref_rows, train_rows = _render(ref, renderer, drops), _render(train, renderer, drops)
    _nonempty(ref_rows, ref, "reference corpus")
    _nonempty(train_rows, train, "training corpus")
    return _Sets(train_rows, ref_rows, [train, ref], {"mode": "files", "files": [s.label for s in ref_files]}, across)


def _sets_from_split(train: _Corpus, data: DataConfig, renderer: Renderer, drops: list[dict[str, str]]) -> _Sets:
    rows = _render(train, renderer, drops)
    _nonempty(rows, train, "training corpus")
    n_ref = reference_size(len(rows), data)
    chosen = set(split_order((r.sample_id for r in rows), data.split_seed)[:n_ref])
    split = {
        "mode": "count" if data.reference_count is not None else "fraction",
        "seed": data.split_seed,
        "reference_count": n_ref,
        "reference_fraction": data.reference_fraction,
    }
    # Both sets keep file order: training order is the file order in the paper (docs/method.md §11 item 8).
    return _Sets([r for r in rows if r.sample_id not in chosen], [r for r in rows if r.sample_id in chosen],
                 [train], split)


def _manifest(cfg: PipelineConfig, key: str, fingerprint: str, template: str, inputs: dict[str, Any],
              sets: _Sets, summaries: dict[str, dict[str, Any]], drops: list[dict[str, str]]) -> dict[str, Any]:
    corpora = sets.corpora
    return {
        "stage": STAGE,
        "version": PREPARE_VERSION,
        "key": key,
        "model": portable_model_ref(cfg.model.name_or_path),  # a model in a bucket run's mirror: its URI
        "tokenizer": portable_model_ref(cfg.model.tokenizer or cfg.model.name_or_path),
        "tokenizer_fingerprint": fingerprint,
        "template": template,
        "max_length": cfg.data.max_length,
        "data": config_to_dict(cfg.data),
        "inputs": inputs,
        "split": sets.split,
        "counts": {
            "records_read": sum(c.records_read for c in corpora),
            "duplicates_within_corpus": sum(c.duplicates_within for c in corpora),
            "duplicates_across_removed_from_train": sets.across,
            "truncated": sum(s["truncated"] for s in summaries.values()),
            "dropped": dict(sorted(sum((c.dropped for c in corpora), Counter()).items())),
            "by_corpus": {c.name: c.counts() for c in corpora},
        },
        "dropped_samples": drops,
        "sets": summaries,
    }


# ------------------------------------------------------------------------------------------------
# stage
# ------------------------------------------------------------------------------------------------
def run_prepare(cfg: PipelineConfig) -> PrepareResult:
    data = cfg.data
    if not data.train_files:
        raise DataError("data.train_files is empty: nothing to prepare")
    train_files = resolve_inputs(data.train_files)
    ref_files = resolve_inputs(data.reference_files) if data.reference_files else []
    tok = load_tokenizer(cfg.model)
    fingerprint = tokenizer_fingerprint(tok)
    hashes = {"train": [s.fingerprint() for s in train_files], "reference": [s.fingerprint() for s in ref_files]}
    key = prepare_key(hashes, data, fingerprint, data.max_length)
    out = stage_dir(cfg.run_dir, STAGE, key)
    if is_complete(out):
        log.info("prepare: %s is complete for these inputs; reusing it, nothing to do", out)
        return PrepareResult.at(out, key, cached=True)

    renderer = Renderer(tok, data.template, data.max_length)
    drops: list[dict[str, str]] = []
    train_corpus = _load_corpus("train", train_files, data)
    if ref_files:
        sets = _sets_from_reference_files(train_corpus, ref_files, data, renderer, drops)
    else:
        sets = _sets_from_split(train_corpus, data, renderer, drops)

    tables = {"train": rows_to_table(r.__dict__ for r in sets.train),
              "reference": rows_to_table(r.__dict__ for r in sets.reference)}
    summaries = {"train": _set_summary(tables["train"], sets.train),
                 "reference": _set_summary(tables["reference"], sets.reference)}
    inputs = {name: [{"path": s.label, "sha256": h} for s, h in zip(files, hashes[name])]
              for name, files in (("train", train_files), ("reference", ref_files))}
    manifest = _manifest(cfg, key, fingerprint, renderer.template, inputs, sets, summaries, drops)
    with atomic_dir(out, overwrite=True) as tmp:  # all or nothing: a crash leaves no folder behind
        write_token_table(tables["train"], tmp / TRAIN_FILE)
        write_token_table(tables["reference"], tmp / REFERENCE_FILE)
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
    # after the rename: on object storage the marker must be the last object written
    mark_complete(out, {"stage": STAGE, "key": key, **{k: v["content_hash"] for k, v in summaries.items()}})
    counts = manifest["counts"]
    log.info(
        "prepare: wrote %s (train %d samples / %d tokens, reference %d / %d, dropped %s, "
        "duplicates %d within, %d across)",
        out, summaries["train"]["n_samples"], summaries["train"]["n_tokens"], summaries["reference"]["n_samples"],
        summaries["reference"]["n_tokens"], counts["dropped"], counts["duplicates_within_corpus"], sets.across,
    )
    return PrepareResult.at(out, key, cached=False)
