"""ASDiv math word problems, 0-shot.

Headline (the issue's protocol): greedy generation after lm-eval's prompt, cut at the first
newline, exact match against the answer with its unit stripped (``metrics.asdiv_match``; a reply
with no number where a number is expected is *unparsable*, counted wrong and counted).

Difference from the paper (docs/method.md §8): lm-eval's ``asdiv`` is a *loglikelihood* task whose acc is
``is_greedy`` - whether the target " 9" is the model's greedy continuation token by token.  That
variant is available as ``eval.asdiv_mode: loglikelihood`` (metric ``is_greedy``) or ``both``.

A dataset in the ``EleutherAI/asdiv`` schema (body, question, solution_type, answer, formula) gives the
same docs, except ``id`` (None: that schema has no problem ID, unless the dataset has an ``id`` column).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from . import metrics
from .base import Doc, EvalDataError, HubRow, Input, gen_request, load_input, mc_request, resolve_input

name = "asdiv"
headline = "acc"
TARGET_DELIMITER = " "


def files(cfg: Any) -> list[Input]:
    return [resolve_input(cfg, "asdiv", "asdiv/ASDiv.xml")]


def prompt(doc: Doc) -> str:
    # lm_eval/tasks/asdiv/default.yaml: "{{body}}\nQuestion:{{question}}\nAnswer:" (no space after "Question:")
    return f"{doc['body']}\nQuestion:{doc['question']}\nAnswer:"


def load(cfg: Any, tokenizer: Any = None) -> list[Doc]:
    return load_input(files(cfg)[0], name, _read_xml, _hub_doc)


def _hub_doc(r: HubRow) -> Doc:
    return {"id": r.row.get("id"), "body": r.text("body"), "question": r.text("question"), "answer": r.text("answer")}


def _read_xml(path: Path) -> list[Doc]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise EvalDataError(f"{path}: not well-formed XML (line {e.position[0]}): {e}") from None
    docs: list[Doc] = []
    for i, prob in enumerate(root.iter("Problem")):
        fields = {}
        for tag in ("Body", "Question", "Answer"):
            el = prob.find(tag)
            if el is None or el.text is None or not el.text.strip():
                raise EvalDataError(f"{path}: problem {i} (ID {prob.get('ID')!r}): missing or empty <{tag}>")
            fields[tag] = el.text  # unstripped, as the EleutherAI/asdiv loader keeps them
        docs.append({"doc_id": i, "id": prob.get("ID"), "body": fields["Body"], "question": fields["Question"],
                     "answer": fields["Answer"]})
    if not docs:
        raise EvalDataError(f"{path}: no <Problem> elements")
    return docs


def requests(doc: Doc, cfg: Any) -> dict[str, Any]:
    mode = getattr(cfg, "asdiv_mode", "generate")
    out: dict[str, Any] = {}
    if mode in ("generate", "both"):
        out["gen"] = gen_request(prompt(doc), stop=["\n"], max_new_tokens=cfg.asdiv_max_new_tokens)
    if mode in ("loglikelihood", "both"):
        out["ll"] = mc_request(prompt(doc), [TARGET_DELIMITER + metrics.asdiv_target(doc["answer"])])
    return out


def score(doc: Doc, answers: dict[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {"doc_id": doc["doc_id"], "gold": metrics.asdiv_target(doc["answer"])}
    if "gen" in answers:
        pred = metrics.clean_generation(answers["gen"])
        acc, parsable = metrics.asdiv_match(pred, doc["answer"])
        rec.update(pred=pred, acc=acc, unparsable=not parsable,
                   exact_match_strict=float(pred == metrics.asdiv_target(doc["answer"]).strip()))
    if "ll" in answers:
        (ll, greedy), = answers["ll"]
        rec.update(ll=ll, is_greedy=float(greedy))
    return rec


def aggregate(records: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    if records and "acc" in records[0]:
        out["acc"] = metrics.mean([r["acc"] for r in records])
        out["exact_match_strict"] = metrics.mean([r["exact_match_strict"] for r in records])
        out["n_unparsable"] = float(sum(r["unparsable"] for r in records))
    if records and "is_greedy" in records[0]:
        out["is_greedy"] = metrics.mean([r["is_greedy"] for r in records])
    return out
