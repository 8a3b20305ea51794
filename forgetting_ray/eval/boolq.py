"""BoolQ (SuperGLUE dev), 0-shot, as lm-eval's ``boolq`` task (super_glue/boolq/default.yaml).

Read from the shipped CSV, or from a dataset in the ``google/boolq`` schema (question, answer: bool,
passage) or the SuperGLUE one (``aps/super_glue`` config ``boolq``: question, passage, idx, label 0/1).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from . import metrics
from .base import Doc, EvalDataError, HubRow, Input, load_input, mc_request, resolve_input

name = "boolq"
headline = "acc"
CHOICES = ["no", "yes"]
TARGET_DELIMITER = " "
HUB_CONFIGS = {"super_glue": "boolq"}


def files(cfg: Any) -> list[Input]:
    return [resolve_input(cfg, "boolq", "boolq/boolq_validation.csv", HUB_CONFIGS)]


def prompt(doc: Doc) -> str:
    return f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"


def load(cfg: Any, tokenizer: Any = None) -> list[Doc]:
    return load_input(files(cfg)[0], name, _read_csv, _hub_doc)


def _hub_doc(r: HubRow) -> Doc:
    if r.has("label"):  # SuperGLUE
        label = r.get("label", int, "0 or 1", lambda v: v in (0, 1))
    else:  # google/boolq
        label = int(r.get("answer", bool, "true or false"))
    return {"passage": r.text("passage"), "question": r.text("question", empty=True), "label": label}


def _read_csv(path: Path) -> list[Doc]:
    docs: list[Doc] = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"question", "passage", "label"} - set(reader.fieldnames or [])
        if missing:
            raise EvalDataError(f"{path}: header lacks column(s) {sorted(missing)} (has {reader.fieldnames})")
        for row_no, row in enumerate(reader, start=2):  # line 1 is the header
            label = (row.get("label") or "").strip()
            if label not in ("0", "1") or not row.get("passage") or row.get("question") is None:
                raise EvalDataError(
                    f"{path}: row {row_no}: expected a passage, a question and label 0/1, got label={label!r}"
                )
            docs.append({"doc_id": len(docs), "passage": row["passage"], "question": row["question"], "label": int(label)})
    if not docs:
        raise EvalDataError(f"{path}: no rows")
    return docs


def requests(doc: Doc, cfg: Any) -> dict[str, Any]:
    return {"mc": mc_request(prompt(doc), [TARGET_DELIMITER + c for c in CHOICES])}


def score(doc: Doc, answers: dict[str, Any]) -> dict[str, Any]:
    lls = [ll for ll, _ in answers["mc"]]
    return {"doc_id": doc["doc_id"], "pred": int(max(range(len(lls)), key=lls.__getitem__)), "gold": doc["label"],
            "lls": lls, "acc": metrics.mc_acc(lls, doc["label"])}


def aggregate(records: list[dict[str, Any]]) -> dict[str, float]:
    return {"acc": metrics.mean([r["acc"] for r in records])}
