"""Agreement with lm-evaluation-harness: 20 BoolQ and 20 TruthfulQA documents.

Both harnesses read the same local files (lm-eval through its own task YAMLs pointed at JSON lines
written from them) and must pick the same choice for every document, with the same log-likelihoods.
Where the two can differ is how a context and its continuation become tokens (whitespace, special
tokens, the boundary between them), so the model is a random 2-layer Llama carrying SmolLM2-135M's real
tokenizer: the real model's weights would add minutes on 2 CPUs and nothing the comparison can see.
"""

from __future__ import annotations

import json

import pytest

from forgetting_ray import tiny
from forgetting_ray.config import PipelineConfig
from forgetting_ray.stages.evaluate import run_eval

from conftest import EVAL_DIR

pytestmark = [pytest.mark.smollm2]


def _records(folder, task):
    return [json.loads(x) for x in (folder / "samples" / f"{task}.jsonl").read_text().splitlines()]


def test_native_agrees_with_lm_eval(smollm2_dir, tmp_path):
    pytest.importorskip("lm_eval")
    model = tiny.build_model("llama", smollm2_dir, tmp_path / "model")  # SmolLM2's tokenizer, random weights
    cfg = PipelineConfig.model_validate({
        "tracking": {"enabled": False},
        "eval": {"data_dir": str(EVAL_DIR), "tasks": ["boolq", "truthfulqa"], "limit": 20, "backend": "local",
                 "batch_size": 16},
    })
    ours = run_eval(cfg, str(model), tmp_path / "native")
    theirs = run_eval(cfg, str(model), tmp_path / "lm_eval", harness="lm-eval")
    for task in ("boolq", "truthfulqa"):
        a, b = _records(tmp_path / "native", task), _records(tmp_path / "lm_eval", task)
        assert len(a) == len(b) == 20
        assert [r["pred"] for r in a] == [r["pred"] for r in b], task  # same choice per document
        for ra, rb in zip(a, b):
            for key in ("lls", "lls_mc1", "lls_mc2"):
                if key in ra:
                    assert ra[key] == pytest.approx(rb[key], abs=2e-3)
    assert ours.metrics["boolq"]["acc"] == theirs.metrics["boolq"]["acc"]
    assert ours.metrics["truthfulqa"]["mc1"] == theirs.metrics["truthfulqa"]["mc1"]
    assert ours.metrics["truthfulqa"]["mc2"] == pytest.approx(theirs.metrics["truthfulqa"]["mc2"], abs=1e-3)
