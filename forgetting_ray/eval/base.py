"""What every task module shares: the request format, subset selection and data errors.

A task turns each document into named *requests* (plain dicts, so they travel through Ray Data as
JSON): ``{"kind": "mc", "context": str, "choices": [continuation, ...]}`` is answered with one
``[loglikelihood, is_greedy]`` pair per choice, ``{"kind": "gen", "prompt": str, "stop": [...],
"max_new_tokens": int, "do_sample": bool, "seed": int}`` with the generated text.  Then the task
scores each document from its answers and averages.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Callable, Protocol, Union

from ..config import EvalConfig, HF_DATASETS_SCHEME
from ..data.sources import DatasetSource, as_spec, is_local_dataset
from ..errors import UserError
from ..store import file_sha256

Doc = dict[str, Any]
Request = dict[str, Any]
# What a task reads: a local benchmark file, or a dataset read with Hugging Face `datasets`.
Input = Union[Path, DatasetSource]


class EvalDataError(UserError, ValueError):
    """A benchmark file is missing or malformed; the message names the file and the row."""


class UnknownTaskError(UserError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class Task(Protocol):
    name: str
    headline: str  # the metric that enters the five-task average

    def files(self, cfg: Any) -> list[Input]: ...

    def load(self, cfg: Any, tokenizer: Any = None) -> list[Doc]: ...

    def requests(self, doc: Doc, cfg: Any) -> dict[str, Request]: ...

    def score(self, doc: Doc, answers: dict[str, Any]) -> dict[str, Any]: ...

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, float]: ...


def mc_request(context: str, choices: list[str]) -> Request:
    return {"kind": "mc", "context": context, "choices": list(choices)}


def gen_request(prompt: str, *, stop: list[str], max_new_tokens: int, do_sample: bool = False, seed: int = 0) -> Request:
    return {
        "kind": "gen",
        "prompt": prompt,
        "stop": list(stop),
        "max_new_tokens": int(max_new_tokens),
        "do_sample": bool(do_sample),
        "seed": int(seed),
    }


# The benchmark files shipped with the package (package data, each folder with its licence and provenance).
SHIPPED_DATA_DIR = Path(__file__).resolve().parent / "data"


def data_dir(cfg: Any) -> Path:
    return Path(cfg.data_dir).expanduser() if cfg.data_dir else SHIPPED_DATA_DIR


def resolve_file(cfg: Any, key: str, default: str) -> Path:
    """``cfg.task_files[key]`` or ``default``, relative to ``cfg.data_dir`` unless absolute."""
    rel = cfg.task_files.get(key, default)
    p = Path(rel).expanduser()
    return p if p.is_absolute() else data_dir(cfg) / p


def require_file(path: Path, task: str) -> Path:
    if not path.is_file():
        raise EvalDataError(
            f"{task}: benchmark file not found: {path} (set eval.data_dir or eval.task_files.{task}; "
            "nothing is downloaded)"
        )
    return path


# ---- benchmarks read through Hugging Face datasets ---------------------------------------------
def resolve_input(cfg: Any, key: str, default: str, hub_configs: dict[str, str] | None = None) -> Input:
    """What ``cfg.task_files[key]`` (or ``default``) names: a dataset (an ``hf://datasets/...`` string, a
    mapping, a dataset folder) as a :class:`DatasetSource`, else a file relative to ``data_dir``.

    A dataset is read from the benchmark's own split unless it names one (EvalConfig.DATASET_SPLITS);
    ``hub_configs`` maps a Hub repository name to the configuration holding the benchmark
    (``truthful_qa`` -> ``multiple_choice``), used when the entry names no configuration.
    """
    entry = cfg.task_files.get(key, default)
    if isinstance(entry, str) and not entry.startswith(HF_DATASETS_SCHEME):
        path = resolve_file(cfg, key, default)
        if not is_local_dataset(path):
            return path
        entry = str(path.resolve())
    spec = EvalConfig.task_dataset(key, as_spec(entry))
    config = (hub_configs or {}).get(spec.path.rstrip("/").rsplit("/", 1)[-1])
    if config and spec.name is None and spec.data_files is None and not is_local_dataset(spec.path):
        spec = spec.model_copy(update={"name": config})
    return DatasetSource(spec)


def check_input(inp: Input, task: str) -> None:
    """Pre-flight: a file exists, a dataset opens (else a SourceError naming it and saying how to fix it)."""
    if isinstance(inp, Path):
        require_file(inp, task)
    else:
        inp.rows()


def input_fingerprint(inp: Input) -> str:
    """The content of a benchmark input: a file's sha256, or the sha256 of a dataset's rows."""
    return file_sha256(inp) if isinstance(inp, Path) else inp.fingerprint()


class HubRow:
    """One dataset row read field by field; a bad field is an EvalDataError naming the dataset, row and field."""

    def __init__(self, label: str, index: int, row: dict[str, Any]) -> None:
        self.label, self.index, self.row = label, index, row

    def has(self, field: str) -> bool:
        return field in self.row

    def error(self, field: str, problem: str) -> EvalDataError:
        return EvalDataError(f"{self.label} row {self.index}: field {field!r} {problem}")

    def get(self, field: str, kind: type | tuple[type, ...], what: str, ok: Callable[[Any], Any] | None = None) -> Any:
        """The field's value: an instance of ``kind`` for which ``ok`` (if given) holds, as ``what`` says."""
        if field not in self.row:
            raise self.error(field, f"is missing (columns: {sorted(self.row)})")
        value = self.row[field]
        if not isinstance(value, kind) or (ok is not None and not ok(value)):
            raise self.error(field, f"must be {what}, got {repr(value)[:80]}")
        return value

    def text(self, field: str, *, empty: bool = False) -> str:
        return self.get(field, str, "a string" if empty else "a non-empty string", lambda v: empty or v.strip())


def hub_rows(source: DatasetSource) -> list[HubRow]:
    rows = source.rows()
    if not rows:
        raise EvalDataError(f"{source.label}: no rows")
    return [HubRow(source.label, i, row) for i, row in enumerate(rows)]


def load_input(inp: Input, task: str, read_file: Callable[[Path], list[Doc]],
               to_doc: Callable[[HubRow], Doc]) -> list[Doc]:
    """A task's docs: ``read_file`` parses its local file; from a dataset, ``to_doc`` maps each row,
    numbered from 0 in row order as the file readers number theirs."""
    if isinstance(inp, Path):
        return read_file(require_file(inp, task))
    return [{"doc_id": r.index, **to_doc(r)} for r in hub_rows(inp)]


def select_indices(n: int, limit: float | None, mode: str = "first", seed: int = 42) -> list[int]:
    """Which of ``n`` documents to evaluate.

    ``limit`` None: all.  A fraction in (0, 1): ``ceil(limit * n)`` documents (lm-eval's ``--limit
    0.99``).  A whole number >= 1: that many.  ``mode='first'`` takes them from the start (lm-eval),
    ``'random'`` a seeded sample, returned in file order.
    """
    if limit is None:
        k = n
    elif 0 < limit < 1:
        k = math.ceil(limit * n)
    elif limit >= 1 and float(limit).is_integer():
        k = min(int(limit), n)
    else:
        raise ValueError(f"eval.limit must be a fraction in (0, 1) or a whole count >= 1, got {limit}")
    if mode == "first":
        return list(range(k))
    if mode == "random":
        return sorted(random.Random(seed).sample(range(n), k))
    raise ValueError(f"unknown eval.limit_mode {mode!r}; use 'first' or 'random'")
