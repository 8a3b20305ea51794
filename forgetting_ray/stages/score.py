"""SCORE stage: per-token NLL under the base and the reference model, score = NLL_base - NLL_ref.

Recipe, top to bottom (``run_score``):

1. ``_resolve_inputs``: read and check the token table, resolve base and reference (an export folder's
   ``adapter/`` when present, else ``merged/``, else a plain HF folder), refuse mismatched tokenizers
   or vocabularies before any work starts, and key the output folder ``<run_dir>/score/<key>/`` by
   everything that changes the numbers (weights, tokenizer, table content, dtype) -- never by batch
   size or concurrency;
2. ``_open_layout``: the shard size the folder was started with (recorded on the first run);
3. ``_reuse_complete``: a finished score set is returned as it is;
4. ``_pending_shards``: every valid finished shard is kept, only the rest is scored;
5. ``_score_pending``: Ray Data reads the table -> splits it into blocks of ``shard_size`` rows ->
   sorts each block by length -> ``map_batches`` into an actor pool (:class:`ScoreActor`, both models
   loaded once per actor) that cuts each batch into token-budget sub-batches and runs ``token_nll``
   twice; the driver collects rows per shard (:class:`_ShardCollector`) and writes each shard (temp
   file + rename) the moment it is complete, so a kill loses at most the shards in flight;
6. ``_mark_done``: the completion marker, with the throughput stats.

Shard ``i`` always holds table rows ``[i*shard_size, (i+1)*shard_size)`` in table order, whatever
order Ray Data delivers them in: that is what makes resume exact.  The maths (``scoring.token_nll``), the
batch planner (``data/batching.py``) and the shard writer (``data/score_set.py``) are plain functions,
testable without a cluster.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

from ..cluster.capacity import bounded_actor_start, check_actor_pool_cpus, gpu_node_resources
from ..cluster.devices import PeakMemory
from ..cluster.session import init_ray, one_footer_actor, ray_data_bars_off
from ..config import ModelConfig, PipelineConfig
from ..data.batching import plan_batches
from ..data.collate import collate
from ..data.score_set import LAYOUT_FILE, existing_shards, shard_name, write_shard
from ..data.table import IGNORE_INDEX, TokenTableError, read_token_table, token_table_hash
from ..errors import UserError
from ..exports import ADAPTER, ModelSource, check_export_base, model_identity, resolve
from ..faults import SCORE_FAULT_ENV, maybe_exit_after_shards, parse_score_fault
from ..models import load_model, load_tokenizer, portable_model, resolve_model_path, stage_device, tokenizer_fingerprint
from ..scoring import token_nll
from ..store import (
    atomic_write_json,
    content_hash,
    fetch_partial,
    is_complete,
    local_copy,
    mark_complete,
    portable,
    read_done,
    stage_dir,
    unmark_complete,
)

log = logging.getLogger(__name__)

STAGE = "score"
# Bump when the numbers or the shard layout change, so old score sets are not reused.
SCORE_VERSION = 1


class ScoreInputError(UserError, ValueError):
    """Bad input found before any scoring work (table, models, tokenizers)."""


@dataclass
class ScoreResult:
    dir: Path
    key: str
    n_samples: int
    n_shards: int
    n_response_tokens: int
    shard_size: int
    reference_mode: str
    cached: bool = False
    shards_scored: list[int] = field(default_factory=list)  # scored by this call
    shards_reused: list[int] = field(default_factory=list)  # finished before this call
    stats: dict[str, float] = field(default_factory=dict)  # wall_s, actor_busy_s, padded/real tokens
    nodes: list[str] = field(default_factory=list)  # Ray node ids of the actors that scored (this call)

    def shard_paths(self) -> list[Path]:
        return [self.dir / shard_name(i) for i in range(self.n_shards)]


# ------------------------------------------------------------------------------------------------
# the models
# ------------------------------------------------------------------------------------------------
def resolve_reference(reference_model: str | Path) -> ModelSource:
    """Export folder -> its ``adapter/`` (one base copy per actor) or ``merged/``; else an adapter or HF folder."""
    p = Path(reference_model).expanduser().resolve()
    if not p.is_dir():
        raise ScoreInputError(f"reference model {p} is not a folder")
    ref = resolve(p, prefer=ADAPTER)
    if ref is None:
        raise ScoreInputError(
            f"reference model {p}: expected an export folder (adapter/ or merged/), a PEFT adapter folder "
            "or a Hugging Face model folder with config.json"
        )
    return ref


def _require_safetensors(folder: str | Path) -> None:
    if not any(Path(folder).glob("*.safetensors")):
        raise ScoreInputError(f"{folder} holds no *.safetensors weights (only safetensors are loaded)")


def _config_vocab(folder: Path) -> int | None:
    f = folder / "config.json"
    if not f.is_file():
        return None
    cfg = json.loads(f.read_text())
    return cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")


def _actor_dtype(cfg: PipelineConfig) -> str:
    """The dtype actors load in: bf16 on GPU, fp32 on CPU unless model.dtype says otherwise."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "bfloat16" if cfg.scoring.num_gpus_per_actor > 0 else "float32"


def score_key(parts: dict[str, Any]) -> str:
    return content_hash({"version": SCORE_VERSION, **parts})


# ------------------------------------------------------------------------------------------------
# inputs and key
# ------------------------------------------------------------------------------------------------
def _check_tokenizers(cfg: PipelineConfig, table: pa.Table, table_path: Path, ref: ModelSource,
                      base_path: str) -> tuple[str, int]:
    """Every mismatch that would make scores silently wrong, before any work. Returns (fingerprint, pad id)."""
    tok = load_tokenizer(cfg.model)
    fp = tokenizer_fingerprint(tok)
    _check_table_tokenizer(cfg, table_path, fp)
    if ref.tokenizer_dir is not None:
        ref_fp = tokenizer_fingerprint(load_tokenizer(ModelConfig(name_or_path=str(ref.tokenizer_dir),
                                                                  tokenizer=str(ref.tokenizer_dir))))
        if ref_fp != fp:
            raise ScoreInputError(
                f"reference tokenizer at {ref.tokenizer_dir} (fingerprint {ref_fp}) differs from the base "
                f"model's {cfg.model.name_or_path!r} (fingerprint {fp}): token ids would mean different tokens"
            )
    vocab_base = _config_vocab(Path(base_path)) if Path(base_path).is_dir() else None
    vocab_ref = _config_vocab(Path(ref.path)) if ref.mode != ADAPTER else vocab_base
    if vocab_base is not None and vocab_ref is not None and vocab_base != vocab_ref:
        raise ScoreInputError(
            f"vocabulary sizes differ: base {base_path} has vocab_size {vocab_base}, reference {ref.path} has "
            f"{vocab_ref}; both models must share one vocabulary"
        )
    vocab = min(v for v in (vocab_base, vocab_ref, len(tok)) if v is not None)
    max_id = pc.max(pc.list_flatten(table.column("input_ids"))).as_py()
    if max_id is not None and max_id >= vocab:
        raise ScoreInputError(
            f"token table {table_path} column 'input_ids' holds id {max_id} >= vocabulary size {vocab}: "
            "it was made with another tokenizer"
        )
    return fp, tok.pad_token_id


def _check_table_tokenizer(cfg: PipelineConfig, table_path: Path, fp: str) -> None:
    """The prepare manifest next to the table names the tokenizer it was made with: it must be the model's."""
    manifest = table_path.parent / "manifest.json"
    if not manifest.is_file():
        log.warning("score: no prepare manifest next to %s; the table's tokenizer cannot be verified", table_path)
        return
    got = json.loads(manifest.read_text()).get("tokenizer_fingerprint")
    if got != fp:
        raise ScoreInputError(
            f"token table {table_path} was tokenized with tokenizer fingerprint {got} (see {manifest}), but "
            f"the configured model {cfg.model.name_or_path!r} has tokenizer fingerprint {fp}: re-run prepare "
            "with this model, or score with the model the table was made for"
        )


@dataclass
class _Inputs:
    table_path: Path
    ref: ModelSource
    base_path: str
    pad_id: int
    dtype: str
    key_parts: dict[str, Any]
    key: str
    out: Path
    ids: list[str]
    n_resp: np.ndarray
    lengths: np.ndarray
    table_hash: str


def _resolve_inputs(cfg: PipelineConfig, train_table: Path, reference_model: Path) -> _Inputs:
    """Read and check everything, compute the key. Raises ScoreInputError before any work."""
    train_table = Path(train_table).resolve()
    try:
        table = read_token_table(train_table)
    except TokenTableError as e:
        raise ScoreInputError(str(e)) from None
    if table.num_rows == 0:
        raise ScoreInputError(f"token table {train_table} has no rows: nothing to score")
    ref = resolve_reference(reference_model)
    base_path = resolve_model_path(cfg.model)
    check_export_base(ref.export_dir, base_path, revision=cfg.model.revision)  # another base's export fails now
    fingerprint, pad_id = _check_tokenizers(cfg, table, train_table, ref, base_path)

    if Path(base_path).is_dir():
        _require_safetensors(base_path)
    _require_safetensors(ref.path)
    table_hash = token_table_hash(table)
    dtype = _actor_dtype(cfg)
    key_parts = {
        "base": model_identity(base_path, revision=cfg.model.revision),
        "reference": {"mode": ref.mode, **model_identity(ref.export_dir or ref.path)},
        "tokenizer": fingerprint,
        "table": table_hash,
        "dtype": dtype,
        "attn_implementation": cfg.model.attn_implementation,
    }
    key = score_key(key_parts)
    return _Inputs(train_table, ref, base_path, pad_id, dtype, key_parts, key, stage_dir(cfg.run_dir, STAGE, key),
                   table.column("sample_id").to_pylist(), table.column("n_response").to_numpy(),
                   table.column("length").to_numpy(), table_hash)


def score_location(cfg: PipelineConfig, train_table: Path, reference_model: Path) -> tuple[str, Path]:
    """(key, folder) where ``run_score`` keeps this score set; checks the inputs, scores nothing."""
    inp = _resolve_inputs(cfg, train_table, reference_model)
    return inp.key, inp.out


# ------------------------------------------------------------------------------------------------
# the Ray Data pieces
# ------------------------------------------------------------------------------------------------
def _select_and_sort(block: pa.Table, pending: list[str] | None) -> pa.Table:
    """One Ray Data block: keep rows of unfinished shards, then sort by length (bucketing)."""
    if pending is not None:
        block = block.filter(pc.is_in(block.column("sample_id"), value_set=pa.array(pending, pa.string())))
    lengths = pc.list_value_length(block.column("input_ids")).to_numpy(zero_copy_only=False)
    return block.take(pa.array(np.argsort(lengths, kind="stable")))


class ScoreActor:
    """Ray Data actor: holds base and reference once, scores batches of token-table rows.

    With an adapter reference there is ONE copy of the base weights: the reference pass runs with
    the LoRA on and the base pass inside ``disable_adapter()``.
    """

    def __init__(self, base_cfg: ModelConfig, ref: dict[str, Any], dtype: str, use_gpu: bool,
                 threads: int, batch_tokens: int, pad_tolerance: float | None, chunk_size: int | None,
                 pad_token_id: int, cpu_stands_in: bool = False) -> None:
        # transformers and peft take seconds to import: only the actors, which load models, pay for them.
        from transformers.utils import logging as hf_logging

        import ray

        hf_logging.disable_progress_bar()  # one bar for the stage (driver), not one per actor
        self.memory = PeakMemory(mapped_files=True)  # the weights are read from their mapping on every batch
        self.node_id = ray.get_runtime_context().get_node_id()
        self.device = stage_device(use_gpu, "scoring.num_gpus_per_actor", cpu_stands_in=cpu_stands_in)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads))  # its CPU share, not every core of the node
        self.batch_tokens, self.pad_tolerance = batch_tokens, pad_tolerance
        self.chunk_size, self.pad_token_id = chunk_size, pad_token_id
        base = load_model(base_cfg, device=self.device, dtype=dtype).eval()
        if ref["mode"] == ADAPTER:
            from peft import PeftModel

            self.ref = PeftModel.from_pretrained(base, str(local_copy(ref["path"])), is_trainable=False).eval()
            self.base = None
        else:
            ref_cfg = base_cfg.model_copy(update={"name_or_path": ref["path"], "tokenizer": None, "revision": None})
            self.ref = load_model(ref_cfg, device=self.device, dtype=dtype).eval()
            self.base = base

    def _nll_pair(self, ids, mask, labels):
        if self.base is None:
            with self.ref.disable_adapter():
                nll_base = token_nll(self.ref, ids, mask, labels, chunk_size=self.chunk_size)
        else:
            nll_base = token_nll(self.base, ids, mask, labels, chunk_size=self.chunk_size)
        nll_ref = token_nll(self.ref, ids, mask, labels, chunk_size=self.chunk_size)
        return nll_base, nll_ref

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids_col, labels_col = batch.column("input_ids").to_pylist(), batch.column("labels").to_pylist()
        lengths = np.fromiter((len(r) for r in ids_col), dtype=np.int64, count=len(ids_col))
        n = len(ids_col)
        base_vals: list[np.ndarray | None] = [None] * n
        ref_vals: list[np.ndarray | None] = [None] * n
        padded = np.zeros(n, dtype=np.int32)
        busy = np.zeros(n, dtype=np.float64)
        with torch.inference_mode():
            for rows in plan_batches(lengths, self.batch_tokens, pad_tolerance=self.pad_tolerance):
                t0 = time.perf_counter()
                t = collate({"input_ids": [ids_col[i] for i in rows], "labels": [labels_col[i] for i in rows]},
                            self.pad_token_id)
                t = {k: v.to(self.device) for k, v in t.items()}
                nll_base, nll_ref = self._nll_pair(t["input_ids"], t["attention_mask"], t["labels"])
                keep = t["labels"] != IGNORE_INDEX
                counts = keep.sum(dim=1).tolist()
                # rows are right-padded, so the masked values come out row by row, positions in order
                b = torch.split(nll_base[keep].float().cpu(), counts)
                r = torch.split(nll_ref[keep].float().cpu(), counts)
                for j, i in enumerate(rows):
                    base_vals[i], ref_vals[i] = b[j].numpy(), r[j].numpy()
                padded[rows] = t["input_ids"].shape[1]
                busy[rows] = (time.perf_counter() - t0) / len(rows)
        return _score_table(batch.column("sample_id"), base_vals, ref_vals, padded, busy, self.node_id,
                            self.memory.peak_bytes())


def _score_table(sample_ids: pa.ChunkedArray, base_vals: list, ref_vals: list, padded: np.ndarray,
                 busy: np.ndarray, node_id: str = "", peak_rss: int = 0) -> pa.Table:
    """An actor's answer: per-row lists of NLLs and scores, plus the per-row bookkeeping columns."""
    n = len(base_vals)
    offsets = np.concatenate([[0], np.cumsum([v.size for v in base_vals])]).astype(np.int32)
    flat_base = np.concatenate(base_vals) if n else np.zeros(0, np.float32)
    flat_ref = np.concatenate(ref_vals) if n else np.zeros(0, np.float32)
    as_list = lambda v: pa.ListArray.from_arrays(pa.array(offsets), pa.array(v, pa.float32()))  # noqa: E731
    return pa.table(
        {
            "sample_id": sample_ids,
            "nll_base": as_list(flat_base),
            "nll_ref": as_list(flat_ref),
            "score": as_list(flat_base - flat_ref),
            "_padded_len": pa.array(padded),
            "_busy_s": pa.array(busy),
            "_actor": pa.array(np.full(n, os.getpid(), dtype=np.int64)),
            "_node": pa.array([node_id] * n, pa.string()),
            "_peak_rss": pa.array(np.full(n, peak_rss, dtype=np.int64)),
        }
    )


def _check_cpu_budget(cfg: PipelineConfig, ray) -> None:
    check_actor_pool_cpus(ray, "scoring", cfg.scoring, res=cfg.resources, error=ScoreInputError)


def _actor_kwargs(cfg: PipelineConfig, inp: _Inputs) -> dict[str, Any]:
    """What each :class:`ScoreActor` is built with (plain data: it travels to the actors)."""
    s = cfg.scoring
    return {
        # locations that load on any node: URIs for what is in a bucket-backed run, alias names for aliases
        "base_cfg": portable_model(cfg.model.model_copy(update={"name_or_path": inp.base_path})),
        "ref": {"mode": inp.ref.mode, "path": portable(inp.ref.path)},
        "dtype": inp.dtype,
        "use_gpu": s.num_gpus_per_actor > 0,
        "threads": max(1, int(s.num_cpus_per_actor)),
        "batch_tokens": s.batch_tokens,
        "pad_tolerance": s.pad_tolerance,
        "chunk_size": s.chunk_size,
        "pad_token_id": inp.pad_id,
        "cpu_stands_in": cfg.resources.cpu_stands_in_for_gpu,
    }


def _stream_scores(cfg: PipelineConfig, table_path: Path, pending_ids: list[str] | None, actor_kwargs: dict,
                   n_blocks_rows: int) -> Iterator[pa.Table]:
    """Ray Data pipeline: read -> blocks of shard_size rows -> sort by length -> actor pool."""
    # a Dataset copies the Ray Data context when it is built: the bound on the actors' start is set before
    with bounded_actor_start("scoring", cfg.scoring, cfg.resources.placement_timeout_s):
        yield from _scores_dataset(cfg, table_path, pending_ids, actor_kwargs, n_blocks_rows)


def _scores_dataset(cfg: PipelineConfig, table_path: Path, pending_ids: list[str] | None, actor_kwargs: dict,
                    n_blocks_rows: int) -> Iterator[pa.Table]:
    # Importing ray takes seconds: only a run that has shards to score pays for it.
    import ray

    s = cfg.scoring
    with ray_data_bars_off():  # the stage's one bar is drawn by the caller
        # Ray Data reads the table where it is stored (a bucket: every node reads it; no shared disk needed)
        with one_footer_actor():
            ds = ray.data.read_parquet(portable(table_path), columns=["sample_id", "input_ids", "labels"],
                                       num_cpus=0.25)
        # Small parquet files arrive as one block (STACK_NOTES Exp 3); blocks of shard_size rows feed every
        # actor and let shards complete (and be written) one after another.
        ds = ds.repartition(target_num_rows_per_block=n_blocks_rows)
        ds = ds.map_batches(_select_and_sort, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
                            fn_kwargs={"pending": pending_ids}, num_cpus=0.25)
        ds = ds.map_batches(
            ScoreActor,
            fn_constructor_kwargs=actor_kwargs,
            batch_size=s.batch_size,
            batch_format="pyarrow",
            # One batch at a time per actor: a batch is seconds of compute, so queueing several on the first
            # actor that starts would leave the others idle (load balance over prefetch).
            compute=ray.data.ActorPoolStrategy(size=s.concurrency, max_tasks_in_flight_per_actor=1),
            num_cpus=s.num_cpus_per_actor,
            num_gpus=s.num_gpus_per_actor or None,
            resources=gpu_node_resources(cfg.resources, s.num_gpus_per_actor) or None,
        )
        yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


# ------------------------------------------------------------------------------------------------
# shards on disk
# ------------------------------------------------------------------------------------------------
class _ShardCollector:
    """Gathers the actors' rows shard by shard, in whatever order they come, and writes each pending
    shard the moment all its rows are in."""

    def __init__(self, inp: _Inputs, size: int, pending: list[int]) -> None:
        self.inp, self.size = inp, size
        self.index = {sid: i for i, sid in enumerate(inp.ids)}
        self.expected = {i: min((i + 1) * size, len(inp.ids)) - i * size for i in pending}
        self.buffers: dict[int, list[pa.Table]] = {i: [] for i in pending}
        self.received: dict[int, set[int]] = {i: set() for i in pending}  # a set: a retried batch may repeat rows

    @property
    def n_rows(self) -> int:
        return sum(self.expected.values())

    def rows_of(self, batch: pa.Table) -> np.ndarray:
        """The table row of each row of ``batch``."""
        return np.fromiter((self.index[x] for x in batch.column("sample_id").to_pylist()), np.int64,
                           count=batch.num_rows)

    def add(self, batch: pa.Table, rows: np.ndarray) -> Iterator[int]:
        """File ``batch``'s rows under their shards; yields each shard as soon as it is written (a generator,
        so that the caller acts on a shard before the next one is written)."""
        inp, size = self.inp, self.size
        shard_of = rows // size
        for i in np.unique(shard_of):
            i = int(i)
            if i not in self.buffers:
                continue  # already written; a retried batch delivered it again
            mine = np.flatnonzero(shard_of == i)
            self.buffers[i].append(batch.take(pa.array(mine)))
            self.received[i].update(rows[mine].tolist())
            if len(self.received[i]) == self.expected[i]:
                write_shard(inp.out, i, self.buffers.pop(i), self.index, inp.ids, inp.n_resp, size, inp.table_path)
                del self.received[i]
                yield i


def _sum_by(keys: np.ndarray, values: np.ndarray) -> tuple[list[int], list[float]]:
    uniq, inv = np.unique(keys, return_inverse=True)
    return uniq.tolist(), np.bincount(inv, weights=values).tolist()


def steady_throughput(blocks: dict[int, list[tuple[float, float, int]]]) -> dict[str, float]:
    """Tokens/s while every actor of the pool is scoring: from the end of the last actor's first block (all
    started, models loaded) to the end of the first actor's last block (none done), counting only blocks computed
    wholly inside that window.  Each actor computes one block at a time, so n actors no faster than one alone
    give at most n times one actor's rate.  ``blocks``: per actor, each block's (start, end, tokens), one clock."""
    if not blocks or any(len(b) < 2 for b in blocks.values()):
        return {}
    start = max(b[0][1] for b in blocks.values())
    end = min(b[-1][1] for b in blocks.values())
    tokens = sum(t for b in blocks.values() for s, e, t in b if s >= start - 1e-9 and e <= end + 1e-9)
    if end <= start or tokens == 0:
        return {}
    return {"steady_tokens_per_s": tokens / (end - start), "steady_window_s": end - start}


class _Meter:
    """Throughput bookkeeping of one scoring pass, for the log and the completion marker's stats."""

    def __init__(self, stats: dict[str, float]) -> None:
        self.stats = stats
        self.per_actor: dict[str, float] = {}  # busy seconds by actor pid: shows the pool is balanced
        self.nodes: set[str] = set()
        self.blocks: dict[int, list[tuple[float, float, int]]] = {}  # actor pid -> (start, end, tokens) per block
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, batch: pa.Table, real_tokens: int) -> None:
        stats = self.stats
        stats["padded_tokens"] += float(batch.column("_padded_len").to_numpy().sum())
        stats["real_tokens"] += float(real_tokens)
        busy_s = batch.column("_busy_s").to_numpy()
        stats["actor_busy_s"] += float(busy_s.sum())
        self.nodes.update(batch.column("_node").unique().to_pylist())
        if len(batch):  # the largest of any actor's high-water marks: what one actor needs
            stats["actor_peak_rss_bytes"] = max(stats.get("actor_peak_rss_bytes", 0.0),
                                                float(pc.max(batch.column("_peak_rss")).as_py()))
        for pid, b in zip(*_sum_by(batch.column("_actor").to_numpy(), busy_s)):
            self.per_actor[str(pid)] = self.per_actor.get(str(pid), 0.0) + b
        if len(batch):  # a block is one actor call: it ended about now, after its compute time
            end = self.elapsed()
            pid = int(batch.column("_actor")[0].as_py())
            self.blocks.setdefault(pid, []).append((end - float(busy_s.sum()), end, real_tokens))
        self.tokens += real_tokens

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def rate(self) -> str:
        return f"{self.tokens / max(self.elapsed(), 1e-9):,.0f} tok/s"

    def finish(self, n_samples: int) -> None:
        el = self.elapsed()
        self.stats["score_s"] = el
        self.stats["actors_used"] = float(len(self.per_actor))
        self.stats["busiest_actor_s"] = max(self.per_actor.values(), default=0.0)
        self.stats.update(steady_throughput(self.blocks))
        log.info("score: scored %d samples (%d tokens) in %.1fs: %.1f samples/s, %.0f tokens/s",
                 n_samples, self.tokens, el, n_samples / el, self.tokens / el)


# ------------------------------------------------------------------------------------------------
# stage
# ------------------------------------------------------------------------------------------------
def _open_layout(cfg: PipelineConfig, inp: _Inputs, reference_model: Path) -> int:
    """The shard size of this score set: the one it was started with, else the configured one, recorded now."""
    s = cfg.scoring
    layout_path = inp.out / LAYOUT_FILE
    if layout_path.is_file():
        layout = json.loads(layout_path.read_text())
        if layout["shard_size"] != s.shard_size:
            log.info("score: %s was started with shard_size %d; keeping it (config says %d)",
                     inp.out, layout["shard_size"], s.shard_size)
    else:
        layout = {"shard_size": s.shard_size, "n_samples": len(inp.ids)}
        atomic_write_json(layout_path, {**layout, "key": inp.key, "inputs": inp.key_parts,
                                        "table_path": str(inp.table_path), "reference_model": str(reference_model),
                                        "base_model": inp.base_path})
    return int(layout["shard_size"])


def _reuse_complete(result: ScoreResult) -> bool:
    """A finished score set with all its shards is the result; one missing shards loses its marker."""
    out = result.dir
    if not is_complete(out):
        return False
    if all((out / shard_name(i)).is_file() for i in range(result.n_shards)):
        log.info("score: reusing cached scores at %s", out)
        result.cached = True
        result.shards_reused = list(range(result.n_shards))
        done = read_done(out)
        result.stats, result.nodes = done.get("stats", {}), done.get("nodes", [])
        return True
    log.warning("score: %s is marked complete but shards are missing; rescoring them", out)
    unmark_complete(out)
    return False


def _pending_shards(inp: _Inputs, result: ScoreResult) -> list[int]:
    """The shards still to score: every valid finished shard is kept (``result.shards_reused``)."""
    done = existing_shards(inp.out, result.n_shards, inp.ids, inp.n_resp, result.shard_size)
    result.shards_reused = sorted(done)
    if done:
        log.info("score: resuming %s: %d of %d shards already finished", inp.out, len(done), result.n_shards)
    return [i for i in range(result.n_shards) if i not in done]


def _score_pending(cfg: PipelineConfig, inp: _Inputs, pending: list[int], result: ScoreResult,
                   stats: dict[str, float]) -> None:
    """Score the pending shards on Ray Data, writing each one as it completes (``result.shards_scored``)."""
    ray = init_ray(cfg.resources.ray_address)
    _check_cpu_budget(cfg, ray)
    exit_after = parse_score_fault(os.environ.get(SCORE_FAULT_ENV))
    size, ids = result.shard_size, inp.ids
    # None: every shard is pending, so the per-block filter can be skipped
    pending_ids = None if not result.shards_reused else [sid for i in pending for sid in ids[i * size : (i + 1) * size]]
    shards = _ShardCollector(inp, size, pending)
    n_todo = shards.n_rows
    bar = tqdm(total=n_todo, unit="sample", desc=f"score {inp.key}", mininterval=1.0, dynamic_ncols=True)
    meter = _Meter(stats)
    try:
        for batch in _stream_scores(cfg, inp.table_path, pending_ids, _actor_kwargs(cfg, inp), size):
            rows = shards.rows_of(batch)
            meter.add(batch, int(inp.lengths[rows].sum()))
            for i in shards.add(batch, rows):
                result.shards_scored.append(i)
                maybe_exit_after_shards(exit_after, len(result.shards_scored))
            stats.setdefault("first_result_s", meter.elapsed())  # ~ actor startup + one batch
            bar.update(batch.num_rows)
            bar.set_postfix_str(meter.rate())
    finally:
        bar.close()
    missing = sorted(set(pending) - set(result.shards_scored))
    if missing:
        raise RuntimeError(f"score: Ray Data returned no scores for shard(s) {missing[:10]} of {inp.out}")
    meter.finish(n_todo)
    result.nodes = sorted(meter.nodes)


def _mark_done(inp: _Inputs, result: ScoreResult, stats: dict[str, float]) -> None:
    result.stats = stats
    mark_complete(inp.out, {"stage": STAGE, "key": inp.key, "n_samples": result.n_samples,
                            "n_shards": result.n_shards, "shard_size": result.shard_size,
                            "n_response_tokens": result.n_response_tokens, "table_hash": inp.table_hash,
                            "reference_mode": inp.ref.mode, "dtype": inp.dtype, "stats": stats,
                            "nodes": result.nodes})


def run_score(cfg: PipelineConfig, train_table: Path, reference_model: Path) -> ScoreResult:
    """Score every response token of ``train_table``; write ``<run_dir>/score/<key>/shard-*.parquet``."""
    t_start = time.perf_counter()
    inp = _resolve_inputs(cfg, train_table, reference_model)  # every bad input fails here, before any work
    fetch_partial(inp.out)  # the shards an interrupted run (perhaps on another node) left in the bucket
    size = _open_layout(cfg, inp, reference_model)
    result = ScoreResult(inp.out, inp.key, len(inp.ids), math.ceil(len(inp.ids) / size), int(inp.n_resp.sum()),
                         size, inp.ref.mode)
    if _reuse_complete(result):
        return result
    pending = _pending_shards(inp, result)
    stats = {"padded_tokens": 0.0, "real_tokens": 0.0, "actor_busy_s": 0.0}
    if pending:
        _score_pending(cfg, inp, pending, result, stats)
    stats["wall_s"] = time.perf_counter() - t_start
    _mark_done(inp, result, stats)
    return result
