"""The study tables in BENCHMARKS.md are regenerated from committed raw records (bench/results/studies/*.json):
the bench's own renderer on a hand-made record, then every committed record against the document."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from bench_harmful_responses import render  # noqa: E402  (the bench's own renderer)

TASKS = {"boolq": "acc", "tydiqa": "f1"}


def _record(seed_offsets: dict[str, float], n_docs: int = 20, seeds: int = 3) -> dict:
    """A raw record whose per-document values are shifted by a per-model offset (known differences)."""
    rng = np.random.default_rng(0)
    base_values = {t: rng.uniform(0.2, 0.8, n_docs) for t in TASKS}

    def samples(offset: float, seed: int) -> dict:
        out = {}
        for task, metric in TASKS.items():
            langs = ["english", "finnish"] * (n_docs // 2) if task == "tydiqa" else [""] * n_docs
            keys = [f"{lang}:{i}" if lang else str(i) for i, lang in enumerate(langs)]
            noise = np.random.default_rng(100 * seed + len(task)).normal(0, 0.01, n_docs)
            out[task] = {"metric": metric, "values": dict(zip(keys, (base_values[task] + offset + noise).tolist())),
                         "groups": dict(zip(keys, langs))}
        return out

    probe = {"heldout_correct_nll": [2.0, 2.2, 1.9], "prefers_correct": [1.0, 0.0, 1.0], "margin": [0.5, -0.1, 0.7]}
    fit = {"samples": 3, "base": 2.3, "reference": 1.2, "gain_relative": 0.48}
    partition = {"threshold": 0.0019, "negative_share": 0.3, "changed_tokens": 0, "changed_negative": float("nan"),
                 "end_of_turn_negative": 0.0, "negatives_end_of_turn_share": 0.0, "answer_format_negative": 0.003,
                 "negatives_answer_format_share": 0.001,
                 "base_nll_quantiles": {"negative": [0.002, 0.74, 5.2], "positive": [0.063, 1.08, 6.14]},
                 "base_nll_bins": {"edges": [0.0, 0.1, float("inf")], "negative": [0.3, 0.7], "positive": [0.13, 0.87]}}
    return {
        "command": "python bench/bench_harmful_responses.py --fraction 0", "date": "2026-12-06", "seconds": 1,
        "args": {"variant": ["selection.base_nll_floor=0.5"], "n_boot": 1000},
        "reference_nll": {"mean_nll_base": 2.06, "mean_nll_ref": 1.52, "heldout_gain": 0.54},
        "reference_fit": {"training split (held out)": fit}, "partitions": {"forgetting": partition},
        "probes": {m: {str(s): probe for s in range(1 if m == "base" else seeds)} for m in seed_offsets},
        "benchmarks": {"seeds": list(range(seeds)), "per_seed": [
            {m: samples(off, s) for m, off in seed_offsets.items()} for s in range(seeds)]},
    }


def test_render_gives_the_known_differences_with_their_labels():
    md = render(json.loads(json.dumps(_record({"base": 0.0, "sft": -0.02, "ignore": 0.0, "forgetting": 0.01,
                                               "variant": 0.01}))))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if " − " in line.split(" | ")[0]}
    assert rows["forgetting − sft"].split(" | ")[3].startswith("+3.00 [")  # the mean column: 0.01 - (-0.02)
    assert rows["sft − base"].split(" | ")[3].startswith("-2.00 [")
    assert "forgetting + selection.base_nll_floor=0.5 − forgetting" in rows
    assert rows["forgetting − sft"].split(" | ")[5].count("/") == 2  # one mean difference per training seed
    assert "| forgetting + selection.base_nll_floor=0.5 | 3 |" in md  # the probe table, labelled
    assert "| [0, 0.1) | ≥ 0.1 |" in md and "| negative | 30.0% | 70.0% |" in md


def test_every_committed_study_table_is_in_the_benchmarks_document():
    records = sorted((REPO / "bench" / "results" / "studies").glob("*.json"))
    assert records, "no raw study record committed under bench/results/studies/"
    doc = (REPO / "BENCHMARKS.md").read_text()
    for path in records:
        table_rows = [line for line in render(json.loads(path.read_text())).splitlines()
                      if line.startswith("| ") and not line.startswith("|---")]
        missing = [line for line in table_rows if line not in doc]
        assert not missing, f"{path.name}: {len(missing)} table rows differ from BENCHMARKS.md, e.g. {missing[:2]}"


# ---- docs/STUDY.md: examples/study/run_study.py's renderer, then the committed record against the document -----
sys.path.insert(0, str(REPO / "examples" / "study"))
from run_study import COMMITTED_REPORTS  # noqa: E402
from run_study import render as render_study  # noqa: E402  (the study script's own renderer)


def _study_record(offsets: dict[str, float], n_docs: int = 30) -> dict:
    """A single-seed study record whose models differ from the base by a known offset on every document."""
    rng = np.random.default_rng(1)
    base = {t: rng.uniform(0.2, 0.8, n_docs) for t in TASKS}
    samples = {}
    for model, offset in offsets.items():
        samples[model] = {}
        for task, metric in TASKS.items():
            langs = ["english", "finnish"] * (n_docs // 2) if task == "tydiqa" else [""] * n_docs
            keys = [f"{lang}:{i}" if lang else str(i) for i, lang in enumerate(langs)]
            samples[model][task] = {"metric": metric, "values": dict(zip(keys, (base[task] + offset).tolist())),
                                    "groups": dict(zip(keys, langs))}
    lora = {"enabled": True, "r": 16}
    return {
        "command": "python examples/study/run_study.py", "date": "2026-12-07", "model": "smollm2-135m", "tiny": False,
        "config": {"data": {"train_files": ["a.tsv"], "max_length": 256}, "resources": {"num_workers": 1},
                   "reference": {"micro_batch_size": 4, "grad_accum": 2, "lr": 3e-4, "lora": lora},
                   "training": {"micro_batch_size": 4, "grad_accum": 2, "lr": 3e-4, "lora": lora,
                                "lambda_schedule": "linear", "t_max": 0.25, "normalization": "micro_batch"},
                   "selection": {"rho": 0.7},
                   "eval": {"tasks": list(TASKS), "harness": "native", "limit": 30, "limit_mode": "random", "seed": 1}},
        "sets": {"train": {"n_samples": 450, "n_response_tokens": 19530}, "reference": {"n_samples": 150,
                                                                                          "n_response_tokens": 6000}},
        "partition": {"n_positive": 7, "n_negative": 3, "threshold": -0.01},
        "steps": {"reference": 48, "train": 112}, "stage_seconds": {"prepare": 6.0, "reference": 306.0},
        "training": [{"name": "train-sft", "steps": 112, "first_pos_nll": 1.9, "last_pos_nll": 2.4,
                      "last_neg_nll": float("nan"), "last_lambda": 0.0}],
        "hashes": {"score key": "abc"}, "n_boot": 500, "confidence": 0.95, "bootstrap_seed": 42,
        "samples": samples,
    }


def test_study_report_is_rendered_from_its_record_with_the_known_differences():
    raw = _study_record({"base": 0.0, "sft": 0.02, "ignore": 0.02, "forgetting": -0.01})
    md = render_study(json.loads(json.dumps(raw)), "Hand-written.")
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in md.splitlines() if " − " in line[:30]}
    assert rows["forgetting − sft"][-2].startswith("-3.00 [-3.00, -3.00]")  # a constant shift: no spread
    assert rows["sft − base"][-2].startswith("+2.00 [")
    assert rows["ignore − sft"][-2].startswith("+0.00 [+0.00, +0.00]")
    assert "19530 response tokens" in md and "7 positive / 3 negative tokens of 10" in md
    assert "| train-sft | 112 | 1.900 | 2.400 | nan | 0.000 |" in md
    assert md.endswith("## Discussion\n\nHand-written.\n") and "| score key | `abc` |" in md



@pytest.mark.parametrize("record,discussion,page", COMMITTED_REPORTS, ids=[p for _, _, p in COMMITTED_REPORTS])
def test_committed_study_page_is_its_record_rendered(record, discussion, page):
    """Each committed study page (docs/STUDY.md, the shorter run) is exactly its raw record rendered, with its
    hand-written discussion appended."""
    from run_study import render_command

    raw = json.loads((REPO / record).read_text(encoding="utf-8"))
    assert raw["n_boot"] == 10_000 and not raw["tiny"]
    assert set(raw["samples"]) == {"base", "sft", "ignore", "forgetting"}
    md = render_study(raw, (REPO / discussion).read_text(encoding="utf-8"), render_command(record, discussion, page))
    assert md == (REPO / page).read_text(encoding="utf-8"), f"{page} is not its record: make tables"
