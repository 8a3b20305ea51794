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
from typing import Any, Protocol

from ..errors import UserError

Doc = dict[str, Any]
Request = dict[str, Any]


class EvalDataError(UserError, ValueError):
    """A benchmark file is missing or malformed; the message names the file and the row."""


class UnknownTaskError(UserError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class Task(Protocol):
    name: str
    headline: str  # the metric that enters the five-task average

    def files(self, cfg: Any) -> list[Path]: ...

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


def resolve_file(cfg: Any, key: str, default: str) -> Path:
    """``cfg.task_files[key]`` or ``default``, relative to ``cfg.data_dir`` unless absolute."""
    rel = cfg.task_files.get(key, default)
    p = Path(rel).expanduser()
    return p if p.is_absolute() else Path(cfg.data_dir).expanduser() / p


def require_file(path: Path, task: str) -> Path:
    if not path.is_file():
        raise EvalDataError(
            f"{task}: benchmark file not found: {path} (set eval.data_dir or eval.task_files.{task}; "
            "nothing is downloaded)"
        )
    return path


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
