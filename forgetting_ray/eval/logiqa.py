"""LogiQA (English test split), 4-way multiple choice as lm-eval's ``logiqa`` task.

The file is parsed exactly as the EleutherAI/logiqa loader did: records separated by blank lines,
each ``label, context, question, 4 options``; the "A." prefixes are cut and every text goes through
``text.replace(".", ". ").strip()`` (that loader's normalisation, kept so prompts match lm-eval).

A dataset is read as is, in the ``lucasmccabe/logiqa`` schema (context, query, options, correct_option
0-3) or the ``EleutherAI/logiqa`` one (label a-d, context, question, options).  lucasmccabe/logiqa's
loader normalised the same text its own way (spacing after full stops, a final "."), so its prompts
differ from lm-eval's in punctuation; EleutherAI/logiqa's are lm-eval's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import metrics
from .base import Doc, EvalDataError, HubRow, Input, load_input, mc_request, resolve_input

name = "logiqa"
headline = "acc"
LETTERS = ["a", "b", "c", "d"]
TARGET_DELIMITER = " "


def files(cfg: Any) -> list[Input]:
    return [resolve_input(cfg, "logiqa", "logiqa/Test.txt")]


def _normalize(text: str) -> str:
    return text.replace(".", ". ").strip()


def prompt(doc: Doc) -> str:
    # lm_eval/tasks/logiqa/utils_logiqa.py: doc_to_text
    out = "Passage: " + doc["context"] + "\n"
    out += "Question: " + doc["question"] + "\nChoices:\n"
    for letter, option in zip(LETTERS, doc["options"]):
        out += f"{letter.upper()}. {option}\n"
    return out + "Answer:"


def load(cfg: Any, tokenizer: Any = None) -> list[Doc]:
    return load_input(files(cfg)[0], name, _read_text, _hub_doc)


def _hub_doc(r: HubRow) -> Doc:
    if r.has("correct_option"):  # lucasmccabe/logiqa
        index = r.get("correct_option", (int, str), "0, 1, 2 or 3", lambda v: str(v) in ("0", "1", "2", "3"))
        label, question = LETTERS[int(index)], r.text("query")
    else:  # EleutherAI/logiqa
        label, question = r.get("label", str, "one of a/b/c/d", lambda v: v in LETTERS), r.text("question")
    options = r.get("options", list, "a list of 4 strings",
                    lambda v: len(v) == 4 and all(isinstance(o, str) for o in v))
    return {"label": label, "context": r.text("context"), "question": question, "options": list(options)}


def _read_text(path: Path) -> list[Doc]:
    text = path.read_text(encoding="utf-8")
    docs: list[Doc] = []
    # Track line numbers so a bad record is reported where it sits in the file.
    lines = text.split("\n")
    block: list[tuple[int, str]] = []

    def flush() -> None:
        if not block:
            return
        first = block[0][0]
        if len(block) != 7:
            raise EvalDataError(
                f"{path}: line {first}: a record needs 7 lines (answer letter, passage, question, "
                f"4 options), got {len(block)}"
            )
        label = block[0][1].strip()
        if label not in LETTERS:
            raise EvalDataError(f"{path}: line {first}: answer must be one of a/b/c/d, got {label!r}")
        # Options are taken by position and their first two characters cut blindly, as lm-eval does:
        # Test.txt has 21 records listing them A, C, B, D and 2 whose option lines lack the
        # "X." prefix (translation artefacts the harness keeps), so the letters are not checked.
        docs.append({
            "doc_id": len(docs),
            "label": label,
            "context": _normalize(block[1][1]),
            "question": _normalize(block[2][1]),
            "options": [_normalize(o[2:]) for _, o in block[3:]],
        })
        block.clear()

    for ln, line in enumerate(lines, start=1):
        if line.strip() == "":
            flush()
        else:
            block.append((ln, line))
    flush()
    if not docs:
        raise EvalDataError(f"{path}: no records")
    return docs


def requests(doc: Doc, cfg: Any) -> dict[str, Any]:
    return {"mc": mc_request(prompt(doc), [TARGET_DELIMITER + o for o in doc["options"]])}


def score(doc: Doc, answers: dict[str, Any]) -> dict[str, Any]:
    lls = [ll for ll, _ in answers["mc"]]
    gold = LETTERS.index(doc["label"])
    return {
        "doc_id": doc["doc_id"],
        "pred": int(max(range(len(lls)), key=lls.__getitem__)),
        "gold": gold,
        "lls": lls,
        "acc": metrics.mc_acc(lls, gold),
        "acc_norm": metrics.mc_acc_norm(lls, doc["options"], gold),
    }


def aggregate(records: list[dict[str, Any]]) -> dict[str, float]:
    return {"acc": metrics.mean([r["acc"] for r in records]), "acc_norm": metrics.mean([r["acc_norm"] for r in records])}
