"""Task registry, the request -> answer loop, scoring, and the results table.

``prepare_requests`` turns tasks into a flat list of JSON-able request rows, ``answer_requests``
runs rows through an :class:`Engine` (in this process or inside a Ray actor), and ``score_tasks``
turns answers back into per-example records and per-task metrics.  No Ray here: the stage module
(forgetting_ray/stages/evaluate.py) moves the rows through a Ray Data actor pool.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, Iterable, Sequence

from . import asdiv, boolq, logiqa, truthfulqa, tydiqa
from .base import Doc, UnknownTaskError, select_indices

TASKS: dict[str, ModuleType] = {m.name: m for m in (truthfulqa, boolq, logiqa, tydiqa, asdiv)}
# The five scores the paper averages (docs/method.md §8).
HEADLINE: dict[str, str] = {name: m.headline for name, m in TASKS.items()}


def get_task(name: str) -> ModuleType:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown eval task {name!r}; known tasks: {sorted(TASKS)}") from None


def load_docs(name: str, cfg: Any, tokenizer: Any = None) -> list[Doc]:
    """The task's documents after the subset rule (TyDiQA applies ``limit`` per language itself)."""
    task = get_task(name)
    docs = task.load(cfg, tokenizer)
    if name == "tydiqa":
        return docs
    return [docs[i] for i in select_indices(len(docs), cfg.limit, cfg.limit_mode, cfg.seed)]


def prepare_requests(docs_by_task: dict[str, list[Doc]], cfg: Any) -> list[dict[str, Any]]:
    """One row per (task, document, request name), sorted by prompt length so that batches
    handed to actors hold similar lengths (the engine buckets again inside each batch)."""
    rows = []
    for name, docs in docs_by_task.items():
        task = get_task(name)
        for pos, doc in enumerate(docs):
            for key, req in task.requests(doc, cfg).items():
                text = req.get("context") or req.get("prompt") or ""
                rows.append({"task": name, "pos": pos, "key": key, "request": req, "_len": len(text)})
    rows.sort(key=lambda r: (r["request"]["kind"], -r["_len"]))
    for r in rows:
        del r["_len"]
    return rows


def answer_requests(engine: Any, requests: Sequence[dict[str, Any]]) -> list[Any]:
    """Answers in request order: ``[[ll, is_greedy], ...]`` for "mc", the generated text for "gen"."""
    out: list[Any] = [None] * len(requests)
    mc = [i for i, r in enumerate(requests) if r["kind"] == "mc"]
    if mc:
        scores = engine.loglikelihood([(requests[i]["context"], requests[i]["choices"]) for i in mc])
        for i, s in zip(mc, scores):
            out[i] = [[c.loglikelihood, c.is_greedy] for c in s]
    # Generation settings differ per task: one engine call per distinct setting.
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        if r["kind"] == "gen":
            groups.setdefault((tuple(r["stop"]), r["max_new_tokens"], r["do_sample"]), []).append(i)
        elif r["kind"] != "mc":
            raise ValueError(f"unknown request kind {r['kind']!r}")
    for (stop, max_new, sample), idx in groups.items():
        # Sampling is seeded per batch from the first request's seed; greedy ignores it.
        texts = engine.generate([requests[i]["prompt"] for i in idx], stop=list(stop), max_new_tokens=max_new,
                                do_sample=sample, seed=requests[idx[0]]["seed"])
        for i, t in zip(idx, texts):
            out[i] = t
    return out


def score_tasks(
    docs_by_task: dict[str, list[Doc]], rows: Sequence[dict[str, Any]], answers: Sequence[Any]
) -> tuple[dict[str, dict[str, float]], dict[str, list[dict[str, Any]]]]:
    """-> (metrics per task, per-example records per task)."""
    got: dict[tuple[str, int], dict[str, Any]] = {}
    for row, ans in zip(rows, answers):
        got.setdefault((row["task"], row["pos"]), {})[row["key"]] = ans
    metrics: dict[str, dict[str, float]] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    for name, docs in docs_by_task.items():
        task = get_task(name)
        recs = []
        for pos, doc in enumerate(docs):
            if (name, pos) not in got:
                raise RuntimeError(f"{name}: no answer for document {doc.get('doc_id', pos)}")
            recs.append(task.score(doc, got[(name, pos)]))
        records[name] = recs
        metrics[name] = {**task.aggregate(recs), "n": float(len(recs))}
    return metrics, records


def headline_scores(metrics: dict[str, dict[str, float]]) -> tuple[dict[str, float], float | None]:
    """Each task's headline metric and their mean (None unless all five tasks ran)."""
    heads = {name: metrics[name][HEADLINE[name]] for name in TASKS if name in metrics and HEADLINE[name] in metrics[name]}
    average = sum(heads.values()) / len(heads) if len(heads) == len(TASKS) else None
    return heads, average


def evaluate_local(engine: Any, cfg: Any, tasks: Iterable[str] | None = None):
    """Everything in this process: load, request, answer, score.  Returns (metrics, records)."""
    names = list(tasks or cfg.tasks)
    docs = {n: load_docs(n, cfg, engine.tok) for n in names}
    rows = prepare_requests(docs, cfg)
    answers = answer_requests(engine, [r["request"] for r in rows])
    return score_tasks(docs, rows, answers)


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of every task's metrics, headline marked with '*', then the average."""
    metrics: dict[str, dict[str, float]] = results["tasks"]
    lines = [f"{'task':<12} {'metric':<20} {'value':>8}", "-" * 42]
    for name, ms in metrics.items():
        for key, val in ms.items():
            star = "*" if HEADLINE.get(name) == key else " "
            shown = f"{int(val):>8d}" if key == "n" or key.startswith("n_") else (
                f"{val:>8.4f}" if isinstance(val, float) and not math.isnan(val) else f"{val!s:>8}")
            lines.append(f"{name:<12} {key + star:<20} {shown}")
    avg = results.get("average")
    lines.append("-" * 42)
    lines.append(f"{'average of * (5 tasks)':<33} " + (f"{avg:>8.4f}" if avg is not None else f"{'n/a':>8}"))
    return "\n".join(lines)
