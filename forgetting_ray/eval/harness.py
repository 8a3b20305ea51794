"""Bridge to lm-evaluation-harness (``pip install lm-eval==0.4.13``): same tasks, same local files.

For BoolQ, TruthfulQA MC1/MC2, LogiQA and ASDiv the harness's *own* task YAMLs are loaded (so its
prompts, delimiters and metric code are used unchanged) and only the dataset is swapped: the
documents this package selected are written as JSON lines in the harness's schema and read with
``datasets``' "json" builder - nothing from the hub.  ASDiv additionally gets a ``generate_until``
twin scored by :func:`metrics.asdiv_match`, and TyDiQA (not an lm-eval task) one ``generate_until``
task per language on the prompts built by :mod:`.tydiqa`, scored by SQuAD EM/F1.

Per-example records are rebuilt from the harness's responses with this package's scorers, so the
two harnesses can be compared example by example; the metrics reported are the harness's own.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..models import load_tokenizer, resolve_dtype, resolve_model_path, stage_device
from . import metrics as M, runner
from .lm import ChatTemplateError

LM_EVAL_REQUIREMENT = "lm-eval==0.4.13"


class HarnessNotInstalled(UserError, ImportError):
    pass


def available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _builtin(rel: str) -> dict[str, Any]:
    """A task YAML shipped with lm-eval, with ``!function`` references resolved."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(Path(lm_eval.__file__).parent / "tasks" / rel)


def _local(cfg: dict[str, Any], task: str, data_file: Path, split: str, cache_dir: Path) -> dict[str, Any]:
    """Point a harness task config at one local JSON-lines file, evaluated as ``split``."""
    cfg = {k: v for k, v in cfg.items() if k not in ("tag", "group")}
    cfg.update(
        task=task,
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {split: str(data_file)}, "cache_dir": str(cache_dir)},
        training_split=None,
        validation_split=split if split == "validation" else None,
        test_split=split if split == "test" else None,
        fewshot_split=None,
        num_fewshot=0,
    )
    return cfg


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- generate_until scorers (module-level: the harness calls them per document) ----------------
def _asdiv_gen_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    acc, parsable = M.asdiv_match(M.clean_generation(results[0]), doc["answer"])
    return {"acc": acc, "unparsable": float(not parsable)}


def _tydiqa_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    pred = M.clean_generation(results[0])
    if "Answer:" in pred:
        pred = pred.split("Answer:")[-1].strip()
    return {"f1": M.squad_f1(pred, doc["answers"]), "em": M.squad_em(pred, doc["answers"])}


def _gen_task(task: str, data_file: Path, cache_dir: Path, doc_to_text: str, max_new: int, sample: bool,
              process_results, metric_names: list[str]) -> dict[str, Any]:
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": doc_to_text,
        "doc_to_target": "",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_new, "do_sample": sample,
                              **({"temperature": 1.0} if sample else {"temperature": 0.0})},
        "process_results": process_results,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metric_names],
        "num_fewshot": 0,
    }


def build_task_configs(docs: dict[str, list[dict[str, Any]]], cfg: Any, workdir: Path) -> dict[str, dict[str, Any]]:
    """harness task name -> task config dict, for the documents already selected by this package."""
    cache = workdir / "hf_cache"
    out: dict[str, dict[str, Any]] = {}
    if "boolq" in docs:
        f = _write_jsonl(workdir / "boolq.jsonl", [
            {"passage": d["passage"], "question": d["question"], "label": d["label"], "idx": d["doc_id"]} for d in docs["boolq"]])
        out["fr_boolq"] = _local(_builtin("super_glue/boolq/default.yaml"), "fr_boolq", f, "validation", cache)
    if "truthfulqa" in docs:
        f = _write_jsonl(workdir / "truthfulqa.jsonl", [
            {"question": d["question"],
             "mc1_targets": {"choices": d["mc1_choices"], "labels": [1] + [0] * (len(d["mc1_choices"]) - 1)},
             "mc2_targets": {"choices": d["mc2_choices"], "labels": d["mc2_labels"]}} for d in docs["truthfulqa"]])
        out["fr_truthfulqa_mc1"] = _local(_builtin("truthfulqa/truthfulqa_mc1.yaml"), "fr_truthfulqa_mc1", f, "validation", cache)
        mc2 = {**_builtin("truthfulqa/truthfulqa_mc1.yaml"), **_builtin("truthfulqa/truthfulqa_mc2.yaml")}
        out["fr_truthfulqa_mc2"] = _local(mc2, "fr_truthfulqa_mc2", f, "validation", cache)
    if "logiqa" in docs:
        f = _write_jsonl(workdir / "logiqa.jsonl", [
            {"label": d["label"], "context": d["context"], "question": d["question"], "options": d["options"]}
            for d in docs["logiqa"]])
        out["fr_logiqa"] = _local(_builtin("logiqa/logiqa.yaml"), "fr_logiqa", f, "test", cache)
    if "asdiv" in docs:
        f = _write_jsonl(workdir / "asdiv.jsonl", [
            {"body": d["body"], "question": d["question"], "answer": d["answer"]} for d in docs["asdiv"]])
        if cfg.asdiv_mode in ("loglikelihood", "both"):
            out["fr_asdiv"] = _local(_builtin("asdiv/default.yaml"), "fr_asdiv", f, "validation", cache)
        if cfg.asdiv_mode in ("generate", "both"):
            out["fr_asdiv_gen"] = _gen_task("fr_asdiv_gen", f, cache, "{{body}}\nQuestion:{{question}}\nAnswer:",
                                            cfg.asdiv_max_new_tokens, False, _asdiv_gen_results, ["acc", "unparsable"])
    if "tydiqa" in docs:
        for lang in sorted({d["lang"] for d in docs["tydiqa"]}):
            f = _write_jsonl(workdir / f"tydiqa_{lang}.jsonl", [
                {"prompt": d["prompt"], "answers": d["answers"]} for d in docs["tydiqa"] if d["lang"] == lang])
            out[f"fr_tydiqa_{lang}"] = _gen_task(f"fr_tydiqa_{lang}", f, cache, "{{prompt}}", cfg.tydiqa_max_new_tokens,
                                                 cfg.tydiqa_decoding == "sample", _tydiqa_results, ["f1", "em"])
    return out


def _metric(res: dict[str, Any], task: str, name: str) -> float:
    return float(res["results"][task][f"{name},none"])


def _samples(res: dict[str, Any], task: str) -> list[dict[str, Any]]:
    return sorted(res["samples"][task], key=lambda s: s["doc_id"])


def _mc_answers(sample: dict[str, Any]) -> list[list[Any]]:
    # filtered_resps: one (loglikelihood, is_greedy) per choice
    return [[float(ll), bool(g)] for ll, g in sample["filtered_resps"]]


def collect(res: dict[str, Any], docs: dict[str, list[dict[str, Any]]], cfg: Any):
    """Harness output -> (metrics per task, per-example records per task), shaped as the native run's."""
    metrics: dict[str, dict[str, float]] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    if "boolq" in docs:
        metrics["boolq"] = {"acc": _metric(res, "fr_boolq", "acc")}
        records["boolq"] = [runner.get_task("boolq").score(d, {"mc": _mc_answers(s)})
                            for d, s in zip(docs["boolq"], _samples(res, "fr_boolq"))]
    if "truthfulqa" in docs:
        metrics["truthfulqa"] = {"mc1": _metric(res, "fr_truthfulqa_mc1", "acc"), "mc2": _metric(res, "fr_truthfulqa_mc2", "acc")}
        task = runner.get_task("truthfulqa")
        recs = []
        for d, s1, s2 in zip(docs["truthfulqa"], _samples(res, "fr_truthfulqa_mc1"), _samples(res, "fr_truthfulqa_mc2")):
            ll = dict(zip(d["mc1_choices"], _mc_answers(s1))) | dict(zip(d["mc2_choices"], _mc_answers(s2)))
            recs.append(task.score(d, {"mc": [ll[c] for c in task.all_choices(d)]}))
        records["truthfulqa"] = recs
    if "logiqa" in docs:
        metrics["logiqa"] = {"acc": _metric(res, "fr_logiqa", "acc"), "acc_norm": _metric(res, "fr_logiqa", "acc_norm")}
        records["logiqa"] = [runner.get_task("logiqa").score(d, {"mc": _mc_answers(s)})
                             for d, s in zip(docs["logiqa"], _samples(res, "fr_logiqa"))]
    if "asdiv" in docs:
        m: dict[str, float] = {}
        answers: list[dict[str, Any]] = [{} for _ in docs["asdiv"]]
        if "fr_asdiv_gen" in res["results"]:
            m["acc"] = _metric(res, "fr_asdiv_gen", "acc")
            m["n_unparsable"] = _metric(res, "fr_asdiv_gen", "unparsable") * len(docs["asdiv"])
            for a, s in zip(answers, _samples(res, "fr_asdiv_gen")):
                a["gen"] = s["filtered_resps"][0]
        if "fr_asdiv" in res["results"]:
            m["is_greedy"] = _metric(res, "fr_asdiv", "acc")
            for a, s in zip(answers, _samples(res, "fr_asdiv")):
                a["ll"] = [[float(s["filtered_resps"][0][0]), bool(s["filtered_resps"][0][1])]]
        metrics["asdiv"] = m
        records["asdiv"] = [runner.get_task("asdiv").score(d, a) for d, a in zip(docs["asdiv"], answers)]
    if "tydiqa" in docs:
        recs = []
        for lang in sorted({d["lang"] for d in docs["tydiqa"]}):
            lang_docs = [d for d in docs["tydiqa"] if d["lang"] == lang]
            recs += [runner.get_task("tydiqa").score(d, {"gen": s["filtered_resps"][0]})
                     for d, s in zip(lang_docs, _samples(res, f"fr_tydiqa_{lang}"))]
        records["tydiqa"] = recs
        metrics["tydiqa"] = runner.get_task("tydiqa").aggregate(recs)  # macro average over languages
    for name in metrics:
        metrics[name]["n"] = float(len(docs[name]))
    return metrics, records


def run_lm_eval(cfg: Any, model_cfg: Any) -> tuple[dict[str, dict[str, float]], dict[str, list[dict[str, Any]]]]:
    """Evaluate through lm-evaluation-harness on the package's document selection."""
    if not available():
        raise HarnessNotInstalled(f"harness 'lm-eval' needs lm-evaluation-harness: pip install {LM_EVAL_REQUIREMENT}")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    e = cfg.eval
    tok = load_tokenizer(model_cfg)
    if e.chat_template and not getattr(tok, "chat_template", None):
        raise ChatTemplateError(f"eval.chat_template is on but the tokenizer of {model_cfg.name_or_path} has none")
    docs = {name: runner.load_docs(name, e, tok) for name in e.tasks}
    path = resolve_model_path(model_cfg)
    dtype = str(resolve_dtype(model_cfg.dtype)).replace("torch.", "")
    device = stage_device(e.num_gpus_per_actor > 0, "eval.num_gpus_per_actor",
                          cpu_stands_in=cfg.resources.cpu_stands_in_for_gpu)
    attn = {"attn_implementation": model_cfg.attn_implementation} if model_cfg.attn_implementation else {}
    lm = HFLM(pretrained=path, dtype=dtype, batch_size=e.batch_size, device=str(device),
              trust_remote_code=model_cfg.trust_remote_code, **attn)  # the rest reaches from_pretrained
    with tempfile.TemporaryDirectory(prefix="fr-lm-eval-") as tmp:
        task_cfgs = build_task_configs(docs, e, Path(tmp))
        res = simple_evaluate(model=lm, tasks=list(task_cfgs.values()), log_samples=True, random_seed=e.seed,
                              numpy_random_seed=e.seed, torch_random_seed=e.seed, fewshot_random_seed=e.seed,
                              apply_chat_template=e.chat_template, bootstrap_iters=0)
    return collect(res, docs, e)
