"""Study report maths (forgetting_ray.report.study) on hand-made per-example samples."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from forgetting_ray.report.study import (
    StudyError,
    StudyReport,
    TaskSamples,
    average_over_seeds,
    compare_models,
    compare_models_over_seeds,
    comparison_table,
    group_mean,
    paired_bootstrap,
    paired_differences,
    read_eval_samples,
    read_task_samples,
    reading,
    results_table,
    score_table,
    seed_example_interval,
    seeds_by_examples,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench_interval_coverage import simulated_study  # noqa: E402  (the benchmark's own simulation)


def ts(task: str, metric: str, values: list[float], langs: list[str] | None = None) -> TaskSamples:
    keys = [f"{(langs or [''] * len(values))[i]}:{i}" if langs else str(i) for i in range(len(values))]
    return TaskSamples(task, metric, dict(zip(keys, map(float, values))),
                       dict(zip(keys, langs or [""] * len(values))))


def write_samples(folder, task, records):
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "samples" / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


# ------------------------------------------------------------------------------------------------
# reading samples
# ------------------------------------------------------------------------------------------------
def test_read_samples_uses_the_headline_field_and_language_keys(tmp_path):
    write_samples(tmp_path, "boolq", [{"doc_id": 0, "acc": 1.0, "lls": [0, 1]}, {"doc_id": 5, "acc": 0.0}])
    write_samples(tmp_path, "truthfulqa", [{"doc_id": 0, "mc1": 1.0, "mc2": 0.25}])
    write_samples(tmp_path, "tydiqa", [{"doc_id": 0, "lang": "english", "f1": 0.5},
                                       {"doc_id": 0, "lang": "finnish", "f1": 1.0}])
    s = read_eval_samples(tmp_path, ["boolq", "truthfulqa", "tydiqa"])
    assert s["boolq"].values == {"0": 1.0, "5": 0.0} and s["boolq"].score() == 0.5
    assert s["truthfulqa"].metric == "mc2" and s["truthfulqa"].values == {"0": 0.25}
    assert set(s["tydiqa"].values) == {"english:0", "finnish:0"}  # same doc_id, two languages


@pytest.mark.parametrize("line, match", [
    ('{"doc_id": 1}', "headline field 'acc'"),
    ('{"doc_id": 1, "acc": "yes"}', "finite number"),
    ("{not json", "malformed JSON"),
])
def test_read_samples_errors_name_file_and_line(tmp_path, line, match):
    p = tmp_path / "boolq.jsonl"
    p.write_text('{"doc_id": 0, "acc": 1.0}\n' + line + "\n")
    with pytest.raises(StudyError, match=match) as e:
        read_task_samples(p, "boolq")
    assert f"{p}:2" in str(e.value)


def test_read_samples_rejects_duplicates_and_missing_files(tmp_path):
    p = tmp_path / "boolq.jsonl"
    p.write_text('{"doc_id": 0, "acc": 1.0}\n{"doc_id": 0, "acc": 0.0}\n')
    with pytest.raises(StudyError, match="twice"):
        read_task_samples(p, "boolq")
    with pytest.raises(StudyError, match="not found"):
        read_task_samples(tmp_path / "nope.jsonl", "boolq")


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------
def test_group_mean_is_the_macro_average():
    v, g = np.array([1.0, 1.0, 1.0, 0.0]), np.array(["en", "en", "en", "fi"])
    assert group_mean(v, g) == 0.5  # (1 + 0) / 2, not 3/4
    assert group_mean(v, np.array([""] * 4)) == 0.75


def test_paired_differences_require_the_same_examples():
    a, b = ts("boolq", "acc", [1, 0, 1]), ts("boolq", "acc", [0, 0, 1])
    d, _ = paired_differences(a, b)
    assert d.tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(StudyError, match="different examples"):
        paired_differences(a, ts("boolq", "acc", [1, 0]))


def test_bootstrap_of_identical_models_is_exactly_zero():
    a = ts("boolq", "acc", [1, 0, 1, 1, 0])
    c = compare_models({"x": {"boolq": a}, "y": {"boolq": a}}, "x", "y", n_boot=200)
    i = c.mean
    assert (i.estimate, i.low, i.high) == (0.0, 0.0, 0.0) and i.within_noise and i.p_two_sided == 1.0


def test_bootstrap_detects_a_large_consistent_gain_and_not_a_coin_flip():
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.5
    better = base | (rng.random(400) < 0.3)  # never worse, often better
    noisy = rng.random(400) < 0.5  # unrelated coin flips, same rate
    s = {"base": {"boolq": ts("boolq", "acc", base)}, "better": {"boolq": ts("boolq", "acc", better)},
         "noisy": {"boolq": ts("boolq", "acc", noisy)}}
    up = compare_models(s, "better", "base", n_boot=2000, seed=1)
    assert up.mean.low > 0 and not up.mean.within_noise and up.mean.p_two_sided < 0.01
    assert up.mean.estimate == pytest.approx(better.mean() - base.mean())
    flat = compare_models(s, "noisy", "base", n_boot=2000, seed=1)
    assert flat.mean.low < flat.mean.estimate < flat.mean.high
    # the interval of a mean of 400 paired +-1/0 differences: half-width about 1.96 * sd / sqrt(n)
    d = noisy.astype(float) - base.astype(float)
    half = 1.96 * d.std() / np.sqrt(d.size)
    assert (flat.mean.high - flat.mean.low) / 2 == pytest.approx(half, rel=0.15)


def test_bootstrap_mean_over_tasks_and_language_strata():
    # task A: +1 on every example; task B (two languages): en +0, fi -1 -> macro -0.5; mean of tasks = 0.25
    diffs = {"A": (np.ones(10), np.array([""] * 10)),
             "B": (np.array([0.0] * 8 + [-1.0] * 2), np.array(["en"] * 8 + ["fi"] * 2))}
    c = paired_bootstrap(diffs, n_boot=500, seed=0, a="f", b="s")
    assert c.per_task["A"].estimate == 1.0 and c.per_task["B"].estimate == -0.5
    assert c.mean.estimate == pytest.approx(0.25)
    # stratified resampling keeps each stratum's size, so constant strata give a degenerate interval
    assert (c.mean.low, c.mean.high) == (pytest.approx(0.25), pytest.approx(0.25))
    assert c.mean.n == 20 and c.per_task["B"].n == 10


def test_bootstrap_is_seeded():
    d = {"A": (np.random.default_rng(3).normal(size=50), np.array([""] * 50))}
    one, two = paired_bootstrap(d, n_boot=300, seed=7), paired_bootstrap(d, n_boot=300, seed=7)
    assert one.mean == two.mean
    assert paired_bootstrap(d, n_boot=300, seed=8).mean.low != one.mean.low


@pytest.mark.parametrize("n_seeds,seed_sd,example_sd", [(3, 0.4, 1.0), (3, 1.0, 0.3), (5, 0.0, 1.0)])
def test_intervals_over_seeds_and_shared_examples_cover_95_percent(n_seeds, seed_sd, example_sd):
    rng = np.random.default_rng(n_seeds)
    studies = [seeds_by_examples(simulated_study(rng, n_seeds, seed_sd, example_sd, 0.7)) for _ in range(400)]
    covered = np.mean([c.mean.low <= 0.0 <= c.mean.high for c in studies])
    covered_a = np.mean([c.per_task["A"].low <= 0.0 <= c.per_task["A"].high for c in studies])
    # 400 studies: a 95 % interval covers 0.95 +- 0.011 (1 sd of the simulation)
    assert 0.92 <= covered <= 0.98 and 0.92 <= covered_a <= 0.98, (covered, covered_a)
    # p-values agree with the intervals: p < 0.05 exactly when 0 is outside
    assert all((c.mean.p_two_sided < 0.05) == (not c.mean.within_noise) for c in studies)


def test_the_seed_by_example_variance_is_the_two_way_anova_estimate():
    v = np.random.default_rng(0).normal(size=(3, 40)) + np.array([[-0.5], [0.0], [0.8]])
    s, n = v.shape
    seed_m, ex_m, m = v.mean(axis=1), v.mean(axis=0), v.mean()
    ms_seed = n * np.sum((seed_m - m) ** 2) / (s - 1)
    ms_ex = s * np.sum((ex_m - m) ** 2) / (n - 1)
    ms_err = np.sum((v - seed_m[:, None] - ex_m[None, :] + m) ** 2) / ((s - 1) * (n - 1))
    var = (ms_seed + ms_ex - ms_err) / (s * n)
    i = seed_example_interval(v)
    assert i.estimate == pytest.approx(m) and i.n == 120
    half = (i.high - i.low) / 2
    df = var**2 / ((ms_seed / (s * n)) ** 2 / (s - 1) + (ms_ex / (s * n)) ** 2 / (n - 1)
                   + (ms_err / (s * n)) ** 2 / ((s - 1) * (n - 1)))
    assert half == pytest.approx(stats.t.ppf(0.975, df) * np.sqrt(var))
    # the same examples, each seed shifted by its own offset: the seed level widens the interval
    narrow = seed_example_interval(v - v.mean(axis=1, keepdims=True))
    assert half > 3 * (narrow.high - narrow.low) / 2
    # one seed: a t interval over the examples
    one = seed_example_interval(v[:1])
    assert (one.high - one.low) / 2 == pytest.approx(stats.t.ppf(0.975, 39) * v[0].std(ddof=1) / np.sqrt(40))
    constant = seed_example_interval(np.full((2, 5), 0.3))
    assert (constant.low, constant.high) == (pytest.approx(0.3), pytest.approx(0.3))
    with pytest.raises(StudyError, match="seeds, examples"):
        seed_example_interval(np.ones(5))


def test_seeds_by_examples_weights_tasks_and_strata_and_checks_the_seeds():
    rng = np.random.default_rng(2)
    diffs = {"A": (rng.normal(size=(3, 12)), np.array([""] * 12)),
             "B": (rng.normal(size=(3, 9)), np.array(["en"] * 5 + ["fi"] * 4))}
    c = seeds_by_examples(diffs)
    b = diffs["B"][0]
    assert c.per_task["A"].estimate == pytest.approx(diffs["A"][0].mean())
    assert c.per_task["B"].estimate == pytest.approx((b[:, :5].mean() + b[:, 5:].mean()) / 2)
    assert c.mean.estimate == pytest.approx((c.per_task["A"].estimate + c.per_task["B"].estimate) / 2)
    assert c.mean.n == 3 * 21 and c.n_seeds == 3 and c.n_boot == 0
    # one seed-level offset shared by both tasks stays whole in the mean's interval
    offset = np.array([[-1.0], [0.0], [1.0]])
    wide = seeds_by_examples({t: (d + offset, g) for t, (d, g) in diffs.items()})
    assert wide.mean.high - wide.mean.low > 2 * (c.mean.high - c.mean.low)
    with pytest.raises(StudyError, match="same seeds"):
        seeds_by_examples({"A": diffs["A"], "B": (diffs["B"][0][:2], diffs["B"][1])})
    with pytest.raises(StudyError, match="same seeds"):
        seeds_by_examples({"A": (np.ones((0, 3)), np.array([""] * 3))})
    with pytest.raises(StudyError, match="seeds_by_examples"):
        paired_bootstrap(diffs)


def test_models_compared_and_averaged_over_training_seeds():
    # seed 0: forgetting +1 on both boolq examples; seed 1: +0; asdiv only in seed 0 is left out
    per_seed = [
        {"sft": {"boolq": ts("boolq", "acc", [0, 0]), "asdiv": ts("asdiv", "acc", [0])},
         "forgetting": {"boolq": ts("boolq", "acc", [1, 1]), "asdiv": ts("asdiv", "acc", [1])}},
        {"sft": {"boolq": ts("boolq", "acc", [1, 0])}, "forgetting": {"boolq": ts("boolq", "acc", [1, 0])}},
    ]
    c = compare_models_over_seeds(per_seed, "forgetting", "sft", n_boot=500)
    assert set(c.per_task) == {"boolq"} and c.mean.estimate == pytest.approx(0.5) and c.mean.n == 4
    assert c.mean.within_noise and c.mean.high - c.mean.low > 1.0  # two seeds that disagree: no conclusion
    single = compare_models_over_seeds(per_seed[:1], "forgetting", "sft", n_boot=500)
    assert single.n_boot == 500 and single.mean.estimate == pytest.approx(1.0)  # one seed: the example bootstrap
    mean = average_over_seeds(per_seed)
    assert set(mean) == {"sft", "forgetting"} and set(mean["sft"]) == {"boolq"}
    assert mean["sft"]["boolq"].score() == pytest.approx(0.25) and mean["forgetting"]["boolq"].score() == 0.75
    per_seed[1]["sft"]["boolq"] = ts("boolq", "acc", [1, 0, 1])
    per_seed[1]["forgetting"]["boolq"] = ts("boolq", "acc", [1, 0, 1])
    with pytest.raises(StudyError, match="other examples than seed #0"):
        compare_models_over_seeds(per_seed, "forgetting", "sft")


def test_bootstrap_rejects_bad_input():
    with pytest.raises(StudyError, match="no tasks"):
        paired_bootstrap({})
    with pytest.raises(StudyError, match="confidence"):
        paired_bootstrap({"A": (np.ones(3), np.array([""] * 3))}, confidence=1.5)


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------
def samples_of_three_models():
    return {
        "base": {"boolq": ts("boolq", "acc", [1, 0, 0, 0]), "asdiv": ts("asdiv", "acc", [0, 0])},
        "sft": {"boolq": ts("boolq", "acc", [1, 1, 0, 0]), "asdiv": ts("asdiv", "acc", [1, 0])},
        "forgetting": {"boolq": ts("boolq", "acc", [1, 1, 1, 0]), "asdiv": ts("asdiv", "acc", [1, 0])},
    }


def test_score_table_values_and_mean():
    text = score_table(samples_of_three_models())
    lines = text.splitlines()
    assert lines[0] == "| model | asdiv (acc) | boolq (acc) | mean |"
    assert "| base | 0.00 | 25.00 | 12.50 |" in lines
    assert "| forgetting | 50.00 | 75.00 | 62.50 |" in lines
    assert lines[-1] == "| *examples* | 2 | 4 | |"


def test_reading_calls_noise_noise_and_a_clear_gain_a_gain():
    s = samples_of_three_models()
    tiny = compare_models(s, "forgetting", "sft", n_boot=500)
    assert "within noise" in reading(tiny) and "+12.50" in reading(tiny)
    big = {m: {"boolq": ts("boolq", "acc", v)} for m, v in (("f", [1] * 50), ("s", [0] * 50))}
    clear = compare_models(big, "f", "s", n_boot=500)
    text = reading(clear)
    assert "f is better than s" in text and "excludes 0" in text and "within noise" not in text


def test_report_markdown_has_every_section():
    s = samples_of_three_models()
    comps = [compare_models(s, "forgetting", "sft", n_boot=200), compare_models(s, "sft", "base", n_boot=200)]
    md = StudyReport("Study", ["model: x"], s, comps, {"prepare key": "abc123"}, training="| t |",
                     notes=["small run"]).markdown()
    for part in ("# Study", "## Setup", "- model: x", "## Results", "## Paired differences", "forgetting − sft",
                 "sft − base", "## Training", "## Reading", "- small run", "| prepare key | `abc123` |"):
        assert part in md, part
    assert comparison_table(comps).count("\n") == 3  # header, rule, two rows


def test_the_result_table_shows_each_mean_with_its_interval_and_the_differences_in_words():
    rng = np.random.default_rng(0)
    base = rng.random(300) < 0.5
    samples = {"base": {"boolq": ts("boolq", "acc", base)},
               "sft": {"boolq": ts("boolq", "acc", base & (rng.random(300) < 0.7))},  # loses 15 points
               "ignore": {"boolq": ts("boolq", "acc", base)},
               "forgetting": {"boolq": ts("boolq", "acc", base ^ (rng.random(300) < 0.02))}}  # a few flips
    table = results_table(samples, n_boot=1000)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert re.fullmatch(r"\| base \| \d+\.\d\d \| \d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\] \|", rows["base"])
    assert set(rows) >= {"forgetting − sft", "ignore − sft", "forgetting − ignore"} and "sft − ignore" not in rows
    assert "better, distinguishable from zero at 300 documents per task" in rows["forgetting − sft"]
    assert "within noise at 300 documents per task" in rows["forgetting − ignore"]
    only_one = results_table({"forgetting": samples["forgetting"]})
    assert "Paired differences" not in only_one and only_one.count("\n") == 2


def test_the_pipeline_parent_run_gets_scores_and_the_paired_differences(tmp_path):
    from types import SimpleNamespace

    from forgetting_ray.pipeline import result_metrics

    rng = np.random.default_rng(1)
    base = rng.random(200) < 0.5
    answers = {"sft": base & (rng.random(200) < 0.6), "ignore": base, "forgetting": base | (rng.random(200) < 0.1)}
    evals = {}
    for name, acc in answers.items():
        write_samples(tmp_path / name, "boolq", [{"doc_id": i, "acc": bool(a)} for i, a in enumerate(acc)])
        evals[name] = SimpleNamespace(out_dir=tmp_path / name, headline={"boolq": acc.mean()}, average=acc.mean())
    m = result_metrics(evals, "forgetting")
    assert m["forgetting.boolq"] == m["forgetting.mean"] == pytest.approx(answers["forgetting"].mean())
    assert m["forgetting-sft.mean"] == pytest.approx(answers["forgetting"].mean() - answers["sft"].mean())
    assert m["forgetting-sft.ci_low"] > 0 and m["forgetting-sft.p"] < 0.01
    assert m["forgetting-ignore.ci_low"] <= m["forgetting-ignore.mean"] <= m["forgetting-ignore.ci_high"]
    assert "sft-ignore.mean" not in m and set(result_metrics({"forgetting": evals["forgetting"]}, "forgetting")) == {
        "forgetting.boolq", "forgetting.mean"}


def test_the_results_page_shows_the_same_table_and_readings(tmp_path):
    from forgetting_ray.report.html import write_results_page

    rng = np.random.default_rng(1)
    base = rng.random(200) < 0.5
    samples = {"sft": {"boolq": ts("boolq", "acc", base & (rng.random(200) < 0.7))},
               "forgetting": {"boolq": ts("boolq", "acc", base)}}
    table = results_table(samples, n_boot=500)
    page = write_results_page(table, tmp_path / "report" / "results.html", meta="tiny · run").read_text()
    assert page.count("<table>") == 2 and "Content-Security-Policy" in page and "<script" not in page
    difference = next(line for line in table.splitlines() if line.startswith("| forgetting − sft"))
    for cell in difference.strip("| ").split(" | "):
        assert f"<td>{cell}</td>" in page, cell  # every cell of the printed table, as printed
    assert "Paired differences, points (95 % bootstrap over the same 200 documents per task):" in page
