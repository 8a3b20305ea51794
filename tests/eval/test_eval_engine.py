"""Scoring engine: prefix (KV) reuse equals the naive full forward, lm-eval's tokenization and
log-likelihoods are reproduced, greedy generation equals transformers' generate; run_eval end to end."""

from __future__ import annotations

import json

import pytest
import torch

from forgetting_ray.config import PipelineConfig
from forgetting_ray.eval.lm import ChatTemplateError, Engine

from conftest import EVAL_DIR

# Contexts of different lengths (left padding inside a batch), trailing spaces (moved to the
# continuation), and continuations of 1 to many tokens.
GROUPS = [
    ("Question: is the sky blue?\nAnswer:", [" yes", " no", " it depends on the weather today"]),
    ("Passage: a long passage about cats and dogs and their habits.\nQuestion: which?\nAnswer: ", ["cats", "dogs"]),
    ("Q: 2+2?\nA:", [" 4", " four", " 5.", " I have no comment."]),
    ("short", [" x"]),
]


def _engine(folder, **kw) -> Engine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return Engine(model, AutoTokenizer.from_pretrained(folder), **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neo", "gemma3"])
def test_prefix_reuse_equals_naive_forward(tiny_models, arch):
    fast = _engine(tiny_models[arch], batch_size=3, prefix_reuse=True)
    slow = Engine(fast.model, fast.tok, batch_size=2, prefix_reuse=False)
    a, b = fast.loglikelihood(GROUPS), slow.loglikelihood(GROUPS)
    assert [len(g) for g in a] == [len(c) for _, c in GROUPS]
    for ga, gb in zip(a, b):
        for x, y in zip(ga, gb):
            assert x.loglikelihood == pytest.approx(y.loglikelihood, abs=1e-4)
            assert x.is_greedy == y.is_greedy
    # batch composition must not change a score
    alone = fast.loglikelihood(GROUPS[2:3])[0]
    assert [s.loglikelihood for s in alone] == pytest.approx([s.loglikelihood for s in a[2]], abs=1e-4)


def test_loglikelihood_equals_manual_sum(tiny_llama):
    eng = _engine(tiny_llama)
    ctx, cont = eng.encode_pair("Question: why?\nAnswer:", " because")
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(eng.model(ids).logits.float(), -1)[0]
    manual = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
    (got,) = eng.loglikelihood([("Question: why?\nAnswer:", [" because"])])[0:1][0]
    assert got.loglikelihood == pytest.approx(manual, abs=1e-4)


def test_matches_lm_eval_hflm(tiny_llama):
    """Same token split and same (loglikelihood, is_greedy) as lm-eval's HFLM on one model object."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    eng = _engine(tiny_llama)
    hf = HFLM(pretrained=eng.model, tokenizer=eng.tok, batch_size=4)
    reqs, ours = [], []
    for ctx, conts in GROUPS:
        for c in conts:
            assert hf._encode_pair(ctx, c) == tuple(eng.encode_pair(ctx, c))
            reqs.append(Instance(request_type="loglikelihood", doc={}, arguments=(ctx, c), idx=len(reqs)))
    theirs = hf.loglikelihood(reqs, disable_tqdm=True)
    ours = [s for g in eng.loglikelihood(GROUPS) for s in g]
    for (ll, greedy), s in zip(theirs, ours):
        assert s.loglikelihood == pytest.approx(ll, abs=1e-4)
        assert s.is_greedy == greedy


def test_greedy_generation_matches_transformers_generate(tiny_llama):
    eng = _engine(tiny_llama, batch_size=3)
    prompts = ["Question: how many?\nAnswer:", "A much longer prompt about apples and pears.\nAnswer:", "Hi"]
    got = eng.generate(prompts, stop=[], max_new_tokens=8)
    for p, g in zip(prompts, got):
        ids = torch.tensor([eng.tok.encode(p)])
        out = eng.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 pad_token_id=eng.pad_id, eos_token_id=eng.tok.eos_token_id)
        assert g == eng.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    cut = eng.generate(prompts, stop=[" "], max_new_tokens=8)
    assert all(" " not in c for c in cut)
    assert all(full.startswith(c) for c, full in zip(cut, got))
    # sampling is seeded: same seed, same text
    kw = dict(do_sample=True, seed=3, max_new_tokens=8)
    assert eng.generate(prompts, **kw) == eng.generate(prompts, **kw)


def test_chat_template_requested_but_missing(tmp_path, tiny_plain_tokenizer_dir, tiny_tokenizer_dir):
    from forgetting_ray import tiny

    folder = tiny.build_model("llama", tiny_plain_tokenizer_dir, tmp_path / "plain")
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        _engine(folder, chat_template=True)
    from forgetting_ray.stages.evaluate import run_eval

    cfg = PipelineConfig.model_validate({"tracking": {"enabled": False}, "eval": {
        "data_dir": str(EVAL_DIR), "chat_template": True, "backend": "local", "tasks": ["boolq"], "limit": 1}})
    with pytest.raises(ChatTemplateError):
        run_eval(cfg, str(folder), tmp_path / "out")
    assert not (tmp_path / "out" / "results.json").exists()
    # with a template, the prompt becomes one user turn
    eng = _engine(tiny.build_model("llama", tiny_tokenizer_dir, tmp_path / "chat"), chat_template=True)
    assert eng.format_prompt("Q?").startswith("<|im_start|>user\nQ?<|im_end|>")


def test_run_eval_local_writes_results_and_logs_mlflow(tiny_llama, tmp_path):
    from forgetting_ray.stages.evaluate import format_table, run_eval

    db = tmp_path / "mlflow.db"
    cfg = PipelineConfig.model_validate({
        "run_dir": str(tmp_path / "run"),
        "tracking": {"enabled": True, "tracking_uri": f"sqlite:///{db}", "experiment_name": "eval-test"},
        "eval": {"data_dir": str(EVAL_DIR), "limit": 2, "backend": "local", "asdiv_mode": "both",
                 "asdiv_max_new_tokens": 4, "tydiqa_max_new_tokens": 4, "tydiqa_max_context_tokens": 64},
    })
    res = run_eval(cfg, str(tiny_llama), tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(saved["tasks"]) == {"truthfulqa", "boolq", "logiqa", "tydiqa", "asdiv"}
    assert all(m["n"] == 2 for m in saved["tasks"].values())
    assert saved["average"] == pytest.approx(sum(res.headline.values()) / 5)
    assert set(saved["tasks"]["asdiv"]) >= {"acc", "is_greedy", "n_unparsable"}
    for name in saved["tasks"]:
        assert len((tmp_path / "out" / "samples" / f"{name}.jsonl").read_text().splitlines()) == 2
    assert "average" in format_table(saved) and "boolq" in format_table(res)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("eval-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.metrics["eval.boolq.acc"] == pytest.approx(saved["tasks"]["boolq"]["acc"])
    assert run.data.metrics["eval.average"] == pytest.approx(saved["average"])
    assert run.info.status == "FINISHED"
    # each benchmark subset is listed as a dataset of the run (its files' content and the limit)
    inputs = {i.dataset.name: i for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert set(inputs) == set(saved["tasks"])
    assert '"num_rows": 2' in inputs["boolq"].dataset.profile and "boolq" in inputs["boolq"].dataset.source


def test_run_eval_rejects_unknown_harness_and_task(tiny_llama, tmp_path):
    from forgetting_ray.eval.base import UnknownTaskError
    from forgetting_ray.stages.evaluate import run_eval

    cfg = PipelineConfig.model_validate({"tracking": {"enabled": False}, "eval": {"data_dir": str(EVAL_DIR)}})
    with pytest.raises(ValueError, match="unknown harness"):
        run_eval(cfg, str(tiny_llama), tmp_path, harness="helm")
    cfg.eval.__dict__["tasks"] = ["boolq", "squad"]  # bypass validation: run_eval checks again
    with pytest.raises(UnknownTaskError, match="squad"):
        run_eval(cfg, str(tiny_llama), tmp_path)
