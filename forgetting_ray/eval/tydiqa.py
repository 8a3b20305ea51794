"""TyDi QA GoldP, 1-shot with the gold passage, as open-instruct's ``eval/tydiqa/run_eval.py`` (docs/method.md §8).

Prompt: instruction + "\\n\\n" + one demonstration "Passage: {ctx}\\nQuestion: {q}\\nAnswer: {gold}" +
"\\n\\n" + "Passage: {ctx}\\nQuestion: {q}\\nAnswer:", with each language's translated strings; passages
cut to ``tydiqa_max_context_tokens`` tokens (encode, keep the first N, decode); up to 50 new tokens,
stop at a newline; SQuAD EM/F1 per language, macro-averaged.

Differences, by necessity: only the English GoldP *train* file is shipped, so the other languages
take their demonstration from their own dev file (drawn with the seed, then excluded from that
language's test examples).  Decoding is greedy by default; ``tydiqa_decoding: sample`` gives the
paper's temperature-1 sampling, but seeded.  Scores are fractions in [0, 1] (open-instruct: x100).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ..data.sources import DatasetSource
from . import metrics
from .base import (
    Doc,
    EvalDataError,
    Input,
    gen_request,
    hub_rows,
    require_file,
    resolve_file,
    resolve_input,
    select_indices,
)

name = "tydiqa"
headline = "f1"

# open-instruct eval/tydiqa/run_eval.py: encoding_templates_with_context
TEMPLATES: dict[str, tuple[str, str, str, str]] = {
    "english": ("Answer the following question based on the information in the given passage.", "Passage:", "Question:", "Answer:"),
    "arabic": ("أجب على السؤال التالي بناءً على المعلومات في المقطع المعطى.", "المقطع:", "السؤال:", "الإجابة:"),
    "bengali": ("প্রদত্ত অধ্যায়ের তথ্যের উপর ভিত্তি করে নিম্নলিখিত প্রশ্নের উত্তর দিন।", "অধ্যায়:", "প্রশ্ন:", "উত্তর:"),
    "finnish": ("Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.", "Kappale:", "Kysymys:", "Vastaus:"),
    "indonesian": ("Jawab pertanyaan berikut berdasarkan informasi di bagian yang diberikan.", "Bagian:", "Pertanyaan:", "Jawaban:"),
    "korean": ("주어진 문단의 정보에 기반하여 다음 질문에 답하십시오.", "문단:", "질문:", "답변:"),
    "russian": ("Ответьте на следующий вопрос на основе информации в данном отрывке.", "Отрывок:", "Вопрос:", "Ответ:"),
    "swahili": ("Jibu swali lifuatalo kulingana na habari kwenye kifungu kilichotolewa.", "Kifungu:", "Swali:", "Jibu:"),
    "telugu": ("ఇచ్చిన పేరాలోని సమాచారం ఆధారంగా కింది ప్రశ్నకు సమాధానం ఇవ్వండి.", "పేరా:", "ప్రశ్న:", "సమాధానం:"),
}
LANGUAGES = list(TEMPLATES)


DEV, TRAIN = "tydiqa/english_tydiqa_dev.json", "tydiqa/english_tydiqa_train.json"
OTHER_LANGS = "tydiqa/other_langs_dev"
HUB_CONFIGS = {"tydiqa": "secondary_task"}
Examples = dict[str, list[Doc]]  # language -> SQuAD examples {id, lang, context, question, answers}


def _input(cfg: Any, key: str) -> Input:
    return resolve_input(cfg, key, DEV if key == "tydiqa" else TRAIN, HUB_CONFIGS)


def _lang_file(cfg: Any, lang: str) -> Path:
    if lang == "english":
        return resolve_file(cfg, "tydiqa", DEV)
    return resolve_file(cfg, "tydiqa_other_langs", OTHER_LANGS) / f"{lang}_tydiqa_dev.json"


def languages(cfg: Any) -> list[str]:
    return LANGUAGES if cfg.tydiqa_languages == "all" else ["english"]


def files(cfg: Any) -> list[Input]:
    dev = _input(cfg, "tydiqa")
    devs = [_lang_file(cfg, lang) for lang in languages(cfg)] if isinstance(dev, Path) else [dev]
    return devs + [_input(cfg, "tydiqa_train")]


def read_squad(path: Path, lang: str) -> list[Doc]:
    """SQuAD-1.1 JSON -> flat examples; errors name the article/paragraph/qa index."""
    require_file(path, name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    except (KeyError, TypeError):
        raise EvalDataError(f"{path}: expected a SQuAD-1.1 object with a 'data' list") from None
    out: list[Doc] = []
    for a, article in enumerate(data):
        for p, para in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            for q, qa in enumerate(para.get("qas", [])):
                where = f"{path}: data[{a}].paragraphs[{p}].qas[{q}]"
                answers = [x.get("text") for x in qa.get("answers", []) if isinstance(x, dict)]
                if not isinstance(para.get("context"), str) or not isinstance(qa.get("question"), str):
                    raise EvalDataError(f"{where}: missing 'context' or 'question'")
                if not answers or not all(isinstance(t, str) for t in answers):
                    raise EvalDataError(f"{where}: needs at least one answer with a 'text'")
                out.append({"id": qa.get("id", f"{lang}-{len(out)}"), "lang": lang, "context": para["context"],
                            "question": qa["question"], "answers": answers})
    if not out:
        raise EvalDataError(f"{path}: no questions")
    return out


def read_dataset(source: DatasetSource) -> Examples:
    """GoldP rows (id, context, question, answers {text: [...]}) by language, the prefix of their id."""
    out: Examples = {}
    for r in hub_rows(source):
        qid = r.get("id", str, f"'<language>-...', a language of {LANGUAGES}", lambda v: _lang(v) in TEMPLATES)
        answers = r.get("answers", dict, "a {text: [...]} object with at least one answer", _has_texts)
        out.setdefault(_lang(qid), []).append({
            "id": qid, "lang": _lang(qid), "context": r.text("context", empty=True),
            "question": r.text("question", empty=True), "answers": list(answers["text"])})
    return out


def _lang(qid: str) -> str:
    return qid.split("-", 1)[0]


def _has_texts(answers: dict[str, Any]) -> bool:
    texts = answers.get("text")
    return isinstance(texts, list) and bool(texts) and all(isinstance(t, str) for t in texts)


def dev_examples(cfg: Any) -> Examples:
    """Each evaluated language's dev examples: one file per language, or one dataset holding them all."""
    dev = _input(cfg, "tydiqa")
    if isinstance(dev, Path):
        return {lang: read_squad(_lang_file(cfg, lang), lang) for lang in languages(cfg)}
    by_lang = read_dataset(dev)
    for lang in languages(cfg):
        if not by_lang.get(lang):
            raise EvalDataError(f"{dev.label}: no {lang} questions (ids start with their language: '{lang}-...')")
    return by_lang


def train_examples(cfg: Any) -> Examples:
    train = _input(cfg, "tydiqa_train")
    return {"english": read_squad(train, "english")} if isinstance(train, Path) else read_dataset(train)


def truncate_context(text: str, tokenizer: Any, max_tokens: int) -> str:
    """open-instruct's cut: encode, keep the first ``max_tokens`` ids, decode."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.decode(ids[:max_tokens]) if len(ids) > max_tokens else text


def build_prompt(lang: str, demo: Doc, ex: Doc) -> str:
    instruction, p_t, q_t, a_t = TEMPLATES[lang]
    prompt = instruction + "\n\n"
    prompt += f"{p_t} {demo['context']}\n{q_t} {demo['question']}\n{a_t} {demo['answers'][0]}" + "\n\n"
    prompt += f"{p_t} {ex['context']}\n{q_t} {ex['question']}\n"
    return prompt + a_t


def load(cfg: Any, tokenizer: Any = None) -> list[Doc]:
    """Per language: the demonstration and the (limited) test examples, prompts built and truncated.

    ``eval.limit`` applies per language (open-instruct: 100 random examples per language).
    """
    if tokenizer is None:
        raise ValueError("tydiqa needs the tokenizer to cut passages to tydiqa_max_context_tokens")
    rng = random.Random(cfg.seed)
    train, devs = train_examples(cfg), dev_examples(cfg)
    docs: list[Doc] = []
    for lang in languages(cfg):
        dev = list(devs[lang])
        if train.get(lang):
            demo = rng.choice(train[lang])
        else:  # no train example in this language: a dev example serves, and is not tested
            demo = dev.pop(rng.randrange(len(dev)))
        cut = lambda d: {**d, "context": truncate_context(d["context"], tokenizer, cfg.tydiqa_max_context_tokens)}  # noqa: E731
        demo = cut(demo)
        for i in select_indices(len(dev), cfg.limit, cfg.limit_mode, cfg.seed):
            ex = cut(dev[i])
            docs.append({"doc_id": len(docs), "id": ex["id"], "lang": lang, "answers": ex["answers"],
                         "prompt": build_prompt(lang, demo, ex)})
    return docs


def requests(doc: Doc, cfg: Any) -> dict[str, Any]:
    sample = cfg.tydiqa_decoding == "sample"
    return {"gen": gen_request(doc["prompt"], stop=["\n"], max_new_tokens=cfg.tydiqa_max_new_tokens,
                               do_sample=sample, seed=cfg.seed + doc["doc_id"])}


def score(doc: Doc, answers: dict[str, Any]) -> dict[str, Any]:
    pred = metrics.clean_generation(answers["gen"])
    if "Answer:" in pred:  # open-instruct's cleaning
        pred = pred.split("Answer:")[-1].strip()
    return {"doc_id": doc["doc_id"], "id": doc["id"], "lang": doc["lang"], "pred": pred, "gold": doc["answers"],
            "f1": metrics.squad_f1(pred, doc["answers"]), "em": metrics.squad_em(pred, doc["answers"])}


def aggregate(records: list[dict[str, Any]]) -> dict[str, float]:
    """Macro average over languages (each language's mean first), plus each language's F1/EM."""
    by_lang: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_lang.setdefault(r["lang"], []).append(r)
    out: dict[str, float] = {}
    for lang, rs in sorted(by_lang.items()):
        out[f"f1_{lang}"] = metrics.mean([r["f1"] for r in rs])
        out[f"em_{lang}"] = metrics.mean([r["em"] for r in rs])
    out["f1"] = metrics.mean([out[f"f1_{lang}"] for lang in by_lang])
    out["em"] = metrics.mean([out[f"em_{lang}"] for lang in by_lang])
    return out
