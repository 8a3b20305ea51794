"""BoolQ (SuperGLUE dev), 0-shot, as lm-eval's ``boolq`` task (super_glue/boolq/default.yaml)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from . import metrics
from .base import Doc, EvalDataError, mc_request, require_file, resolve_file

name = "boolq"
headline = "acc"
CHOICES = ["no", "yes"]
TARGET_DELIMITER = " "


def files(cfg: Any) -> list[Path]:
    return [resolve_file(cfg, "boolq", "boolq/boolq_validation.csv")]


def prompt(doc: Doc) -> str:
    return f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"


def load(cfg: Any, tokenizer: Any = None) -> list[Doc]:
    path = require_file(files(cfg)[0], name)
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
