"""The maths and the Markdown of the study report (``examples/study/run_study.py`` -> ``docs/STUDY.md``).

Every evaluation writes one record per example to ``<eval out_dir>/samples/<task>.jsonl``; the
record carries the task's headline metric for that example (``acc``, ``mc2``, ``f1``).  A task's
score is the mean of those values -- macro-averaged over languages for TyDiQA, like
``eval.tydiqa.aggregate`` -- and the study's "mean" is the plain average of the task scores.

Both statistics are linear in the per-example values, so the difference between two models equals
the same statistic of the per-example differences.  ``paired_bootstrap`` resamples examples with
replacement within each (task, group) stratum, the same indices for both models (paired), and reads
a percentile confidence interval off the replicates: for each task and for the mean over tasks.
A difference whose interval contains 0 is reported as within noise.

Over several training seeds evaluated on the same examples, the seeds and the examples are crossed: an
example's effect on a difference is shared by every seed. ``seeds_by_examples`` estimates the variance of the
mean from the two-way table (method of moments: seed, example and residual mean squares) and reads a t
interval with Satterthwaite's degrees of freedom; docs/method.md §8 says why not a bootstrap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from ..data.readers import iter_jsonl
from ..errors import UserError
from ..eval.runner import HEADLINE


class StudyError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class TaskSamples:
    """One model's per-example headline values on one task, keyed by example."""

    task: str
    metric: str
    values: dict[str, float]  # example key -> value
    groups: dict[str, str]  # example key -> stratum (TyDiQA language; one stratum otherwise)

    def score(self) -> float:
        return group_mean(np.array(list(self.values.values())), np.array([self.groups[k] for k in self.values]))

    def to_raw(self) -> dict[str, Any]:
        """The JSON form a study's raw record keeps (example order kept: the bootstrap draws by position)."""
        return {"metric": self.metric, "values": dict(self.values), "groups": dict(self.groups)}

    @classmethod
    def from_raw(cls, task: str, raw: Mapping[str, Any]) -> TaskSamples:
        return cls(task, raw["metric"], dict(raw["values"]), dict(raw["groups"]))


def example_key(record: Mapping[str, Any]) -> str:
    lang = record.get("lang")
    return f"{lang}:{record['doc_id']}" if lang is not None else str(record["doc_id"])


def read_task_samples(path: str | Path, task: str, metric: str | None = None) -> TaskSamples:
    """Parse ``samples/<task>.jsonl``; errors name the file and line."""
    path = Path(path)
    metric = metric or HEADLINE.get(task)
    if metric is None:
        raise StudyError(f"{path}: unknown task {task!r}; known: {sorted(HEADLINE)}")
    values: dict[str, float] = {}
    groups: dict[str, str] = {}
    if not path.is_file():
        raise StudyError(f"per-example samples not found: {path} (did the evaluation finish?)")
    for lineno, rec in iter_jsonl(path, StudyError):
        if "doc_id" not in rec or metric not in rec:
            raise StudyError(f"{path}:{lineno}: record lacks 'doc_id' or the headline field {metric!r}")
        value = rec[metric]
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise StudyError(f"{path}:{lineno}: field {metric!r} is {value!r}, expected a finite number")
        key = example_key(rec)
        if key in values:
            raise StudyError(f"{path}:{lineno}: example {key!r} appears twice")
        values[key] = float(value)
        groups[key] = str(rec.get("lang", ""))
    if not values:
        raise StudyError(f"{path}: no examples")
    return TaskSamples(task, metric, values, groups)


def read_eval_samples(eval_dir: str | Path, tasks: Iterable[str]) -> dict[str, TaskSamples]:
    eval_dir = Path(eval_dir)
    return {t: read_task_samples(eval_dir / "samples" / f"{t}.jsonl", t) for t in tasks}


def group_mean(values: np.ndarray, groups: np.ndarray) -> float:
    """Mean over groups of each group's mean (a plain mean when there is one group)."""
    names = np.unique(groups)
    return float(np.mean([values[groups == g].mean() for g in names]))


# ------------------------------------------------------------------------------------------------
# paired bootstrap
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    p_two_sided: float  # bootstrap: 2 x the smaller tail share of replicates beyond 0; over seeds: the t test's
    n: int  # examples (for the mean: total over tasks), times the seeds over seeds

    @property
    def within_noise(self) -> bool:
        return self.low <= 0.0 <= self.high


@dataclass(frozen=True)
class PairedComparison:
    a: str
    b: str
    per_task: dict[str, Interval]
    mean: Interval  # the average of the task differences
    confidence: float
    n_boot: int  # 0: not a bootstrap (over seeds: seeds_by_examples)
    n_seeds: int = 1


def paired_differences(a: TaskSamples, b: TaskSamples) -> tuple[np.ndarray, np.ndarray]:
    """(a - b per example, stratum per example) over the same examples; a different example set
    means the two evaluations are not paired, which is an error, not something to paper over."""
    if a.task != b.task or a.metric != b.metric:
        raise StudyError(f"cannot pair {a.task}/{a.metric} with {b.task}/{b.metric}")
    if set(a.values) != set(b.values):
        only_a, only_b = sorted(set(a.values) - set(b.values)), sorted(set(b.values) - set(a.values))
        raise StudyError(
            f"{a.task}: the two evaluations scored different examples ({len(only_a)} only in the first, e.g. "
            f"{only_a[:3]}; {len(only_b)} only in the second, e.g. {only_b[:3]}); use the same eval.limit, "
            "limit_mode and seed"
        )
    keys = sorted(a.values)
    return (np.array([a.values[k] - b.values[k] for k in keys]), np.array([a.groups[k] for k in keys]))


def _interval(estimate: float, reps: np.ndarray, confidence: float, n: int) -> Interval:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(reps, [tail, 1.0 - tail])
    p = 2.0 * min(float(np.mean(reps <= 0.0)), float(np.mean(reps >= 0.0)))
    return Interval(float(estimate), float(low), float(high), min(1.0, p), n)


def paired_bootstrap(
    diffs: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    a: str = "a",
    b: str = "b",
) -> PairedComparison:
    """Percentile bootstrap of each task's difference and of their average, over the examples of one
    evaluation.

    ``diffs``: task -> (differences per example, stratum per example).  Each replicate resamples every
    stratum of every task with replacement (stratified, so a replicate keeps each language's and each task's
    size), computes each task's statistic and their mean.  Several training seeds: :func:`seeds_by_examples`.
    """
    arrays = _checked(diffs, confidence)
    if any(d.ndim != 1 for d in arrays.values()):
        raise StudyError("paired_bootstrap takes one evaluation's differences per example; over training seeds "
                         "use seeds_by_examples")
    rng = np.random.default_rng(seed)
    per_task: dict[str, Interval] = {}
    task_reps = []
    for task in sorted(diffs):
        d, g = arrays[task], np.asarray(diffs[task][1])
        names = np.unique(g)
        reps = np.zeros(n_boot)
        for name in names:
            dg = d[g == name]
            reps += dg[rng.integers(0, dg.size, size=(n_boot, dg.size))].mean(axis=1)
        reps /= len(names)
        per_task[task] = _interval(group_mean(d, g), reps, confidence, int(d.size))
        task_reps.append(reps)
    mean_reps = np.mean(task_reps, axis=0)
    mean_est = float(np.mean([per_task[t].estimate for t in per_task]))
    mean = _interval(mean_est, mean_reps, confidence, sum(i.n for i in per_task.values()))
    return PairedComparison(a, b, per_task, mean, confidence, n_boot)


def _checked(diffs: Mapping[str, tuple[np.ndarray, np.ndarray]], confidence: float) -> dict[str, np.ndarray]:
    if not diffs:
        raise StudyError("no tasks to compare")
    if not 0.0 < confidence < 1.0:
        raise StudyError(f"confidence must be in (0, 1), got {confidence}")
    arrays = {task: np.asarray(diffs[task][0], dtype=np.float64) for task in diffs}
    shapes = {d.shape[:-1] for d in arrays.values()}
    if len(shapes) > 1 or not {d.ndim for d in arrays.values()} <= {1, 2} or (0,) in shapes:
        raise StudyError("differences must all be per example, or all [seeds, examples] with the same seeds; got "
                         f"shapes {sorted(d.shape for d in arrays.values())}")
    for task, d in arrays.items():
        if d.shape[-1] == 0:
            raise StudyError(f"{task}: no paired examples")
    return arrays


@dataclass(frozen=True)
class _Cell:
    """One (task, stratum) block of a [seeds, examples] table and its weight in the statistic."""

    weight: float
    d: np.ndarray  # [seeds, examples]


def _crossed_interval(cells: list[_Cell], confidence: float) -> Interval:
    """t interval of ``sum_c weight_c * mean(d_c)`` with seeds crossed with examples (every seed scored on the
    same examples). Per seed s, theta_s = sum_c w_c mean_i d_c[s, i]; theta = mean_s theta_s. Under
    d = mu + seed_s + example_i + residual_si the variance of theta is
        var(seed)/S + sum_c w_c^2 var(example)_c / n_c + sum_c w_c^2 var(residual)_c / (n_c S),
    estimated by (the seed term) + (the example term) - (the residual term) below, each unbiased for its
    mean square's expectation; Satterthwaite's formula gives the degrees of freedom. With one seed the seed
    term cannot be measured: the interval is over the examples only (and says so through n_seeds)."""
    n_seeds = cells[0].d.shape[0]
    theta_s = sum(c.weight * c.d.mean(axis=1) for c in cells)
    theta = float(np.mean(theta_s))
    terms: list[tuple[float, float]] = []  # (variance estimate, its degrees of freedom)
    seed_term = float(np.var(theta_s, ddof=1)) / n_seeds if n_seeds > 1 else 0.0
    example_term = residual_term = 0.0
    example_df = residual_df = 0
    for c in cells:
        n = c.d.shape[1]
        if n < 2:
            continue
        per_example = c.d.mean(axis=0)
        example_term += c.weight**2 * float(np.var(per_example, ddof=1)) / n
        example_df += n - 1
        if n_seeds > 1:
            resid = c.d - per_example[None, :] - c.d.mean(axis=1, keepdims=True) + c.d.mean()
            residual_term += c.weight**2 * float((resid**2).sum()) / ((n_seeds - 1) * (n - 1)) / (n * n_seeds)
            residual_df += (n_seeds - 1) * (n - 1)
    if n_seeds > 1:
        terms.append((seed_term, n_seeds - 1))
    terms += [(example_term, example_df), (residual_term, residual_df)]
    # each of the first two alone is a lower bound of the truth: the difference may dip below both by chance
    var = max(seed_term + example_term - residual_term, seed_term, example_term)
    n = sum(c.d.size for c in cells)
    if var <= 0.0:
        return Interval(theta, theta, theta, 1.0 if theta == 0.0 else 0.0, n)
    df_den = sum(v * v / df for v, df in terms if df > 0)
    df = var * var / df_den if df_den > 0 else math.inf
    se = math.sqrt(var)
    half = float(stats.t.ppf(0.5 + confidence / 2.0, df)) * se
    p = float(2.0 * stats.t.sf(abs(theta) / se, df))
    return Interval(theta, theta - half, theta + half, min(1.0, p), n)


def _cells(d: np.ndarray, g: np.ndarray, weight: float) -> list[_Cell]:
    names = np.unique(g)
    return [_Cell(weight / len(names), d[:, g == name]) for name in names]


def seeds_by_examples(
    diffs: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    confidence: float = 0.95,
    a: str = "a",
    b: str = "b",
) -> PairedComparison:
    """Each task's difference and their average with intervals over training seeds and examples.

    ``diffs``: task -> (differences ``[seeds, examples]``, the same seeds in the same order for every task;
    stratum per example). A seed is one pair of trained models, shared by every task; the examples are the
    same for every seed. See :func:`_crossed_interval`.
    """
    arrays = _checked(diffs, confidence)
    if any(d.ndim != 2 for d in arrays.values()):
        raise StudyError("seeds_by_examples takes [seeds, examples] differences with the same seeds for every task")
    groups = {task: np.asarray(diffs[task][1]) for task in diffs}
    per_task = {task: _crossed_interval(_cells(arrays[task], groups[task], 1.0), confidence) for task in sorted(diffs)}
    cells = [c for task in sorted(diffs) for c in _cells(arrays[task], groups[task], 1.0 / len(diffs))]
    n_seeds = next(iter(arrays.values())).shape[0]
    return PairedComparison(a, b, per_task, _crossed_interval(cells, confidence), confidence, 0, n_seeds)


def seed_example_interval(values: np.ndarray, *, confidence: float = 0.95) -> Interval:
    """Interval of the mean of ``values[s, i]`` (training seed s, example i, the same examples for every seed)
    over both sources of chance: :func:`seeds_by_examples` on one task of one stratum."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or 0 in v.shape:
        raise StudyError(f"need a [seeds, examples] array with both sizes > 0, got shape {v.shape}")
    return seeds_by_examples({"": (v, np.zeros(v.shape[1]))}, confidence=confidence).mean


def compare_models(
    samples: Mapping[str, Mapping[str, TaskSamples]], a: str, b: str, **kwargs: Any
) -> PairedComparison:
    """``samples``: model -> task -> TaskSamples.  Compares the tasks both models have."""
    tasks = sorted(set(samples[a]) & set(samples[b]))
    diffs = {t: paired_differences(samples[a][t], samples[b][t]) for t in tasks}
    return paired_bootstrap(diffs, a=a, b=b, **kwargs)


def compare_models_over_seeds(
    per_seed: Sequence[Mapping[str, Mapping[str, TaskSamples]]], a: str, b: str, **kwargs: Any
) -> PairedComparison:
    """``per_seed[s]``: model -> task -> TaskSamples for training seed s, every seed's models evaluated on
    the same examples.  Compares the tasks both models have in every seed, with intervals over the seeds
    and the examples (:func:`seeds_by_examples`); one seed: the paired bootstrap over its examples."""
    if not per_seed:
        raise StudyError("no training seeds to compare")
    tasks = sorted(set.intersection(*(set(s[a]) & set(s[b]) for s in per_seed)))
    diffs = {}
    for task in tasks:
        keys = set(per_seed[0][a][task].values)
        for i, s in enumerate(per_seed):
            if set(s[a][task].values) != keys:
                raise StudyError(f"{task}: training seed #{i} was evaluated on other examples than seed #0; use the "
                                 "same eval.limit, limit_mode and seed for every training seed")
        pairs = [paired_differences(s[a][task], s[b][task]) for s in per_seed]
        diffs[task] = (np.stack([d for d, _ in pairs]), pairs[0][1])
    if len(per_seed) == 1:
        return paired_bootstrap({t: (d[0], g) for t, (d, g) in diffs.items()}, a=a, b=b, **kwargs)
    kwargs.pop("n_boot", None)
    kwargs.pop("seed", None)
    return seeds_by_examples(diffs, a=a, b=b, **kwargs)


def average_over_seeds(per_seed: Sequence[Mapping[str, Mapping[str, TaskSamples]]]
                       ) -> dict[str, dict[str, TaskSamples]]:
    """model -> task -> TaskSamples whose per-example values are the mean over the training seeds (every
    score is linear in them, so its score is the mean of the seeds' scores); models and tasks in every seed."""
    models = [m for m in per_seed[0] if all(m in s for s in per_seed)]
    out: dict[str, dict[str, TaskSamples]] = {}
    for m in models:
        out[m] = {}
        for task in set.intersection(*(set(s[m]) for s in per_seed)):
            first = per_seed[0][m][task]
            values = {k: float(np.mean([s[m][task].values[k] for s in per_seed])) for k in first.values}
            out[m][task] = TaskSamples(task, first.metric, values, first.groups)
    return out


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------
def pts(x: float, signed: bool = False) -> str:
    """A fraction as percentage points, two decimals."""
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def score_table(samples: Mapping[str, Mapping[str, TaskSamples]]) -> str:
    """Rows = models, columns = each task's headline metric (percent) and their mean."""
    tasks = sorted({t for per in samples.values() for t in per})
    metric = {t: next(per[t].metric for per in samples.values() if t in per) for t in tasks}
    lines = ["| model | " + " | ".join(f"{t} ({metric[t]})" for t in tasks) + " | mean |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    for name, per in samples.items():
        scores = {t: per[t].score() for t in tasks if t in per}
        cells = [pts(scores[t]) if t in scores else "-" for t in tasks]
        mean = pts(float(np.mean(list(scores.values())))) if len(scores) == len(tasks) else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    n_row = [str(len(next(per[t].values for per in samples.values() if t in per))) for t in tasks]
    lines.append("| *examples* | " + " | ".join(n_row) + " | |")
    return "\n".join(lines)


def model_interval(per_task: Mapping[str, TaskSamples], *, n_boot: int = 2000, seed: int = 0,
                   confidence: float = 0.95) -> Interval:
    """One model's mean over tasks (each task macro-averaged over its strata) with a stratified bootstrap
    interval over its documents."""
    values = {}
    for task, s in per_task.items():
        keys = sorted(s.values)
        values[task] = (np.array([s.values[k] for k in keys]), np.array([s.groups[k] for k in keys]))
    return paired_bootstrap(values, n_boot=n_boot, seed=seed, confidence=confidence).mean


def verdict(i: Interval, documents: int) -> str:
    """In words, whether a difference is distinguishable from zero at this many documents."""
    if i.within_noise:
        return f"within noise at {documents} documents per task"
    return f"{'better' if i.estimate > 0 else 'worse'}, distinguishable from zero at {documents} documents per task"


def results_table(samples: Mapping[str, Mapping[str, TaskSamples]], *, against: Sequence[str] = ("sft", "ignore"),
                  n_boot: int = 2000, seed: int = 0) -> str:
    """What `run`, `eval` and the report print: each model's task scores and its mean with a 95 % interval,
    then every other model's paired difference from each model named in ``against`` (the same documents for
    both; a stratified bootstrap over them) with a p-value and a verdict in words."""
    tasks = sorted({t for per in samples.values() for t in per})
    docs = max((len(next(per[t].values for per in samples.values() if t in per)) for t in tasks), default=0)
    lines = ["| model | " + " | ".join(tasks) + " | mean [95 % CI] |", "|---|" + "---:|" * (len(tasks) + 1)]
    for name, per in samples.items():
        cells = [pts(per[t].score()) if t in per else "-" for t in tasks]
        mean = model_interval(per, n_boot=n_boot, seed=seed) if set(per) == set(tasks) else None
        shown = f"{pts(mean.estimate)} [{pts(mean.low)}, {pts(mean.high)}]" if mean else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {shown} |")
    rank = {name: i for i, name in enumerate(against)}
    pairs = [(a, b) for b in against if b in samples for a in samples
             if a not in ("base", b) and rank.get(a, len(against)) > rank[b]]
    if not pairs:
        return "\n".join(lines)
    lines += ["", f"Paired differences, points (95 % bootstrap over the same {docs} documents per task):", "",
              "| difference | mean [95 % CI] | p | reading |", "|---|---:|---:|---|"]
    for a, b in pairs:
        c = compare_models(samples, a, b, n_boot=n_boot, seed=seed)
        lines.append(f"| {a} − {b} | {_ci(c.mean)} | {c.mean.p_two_sided:.3f} | {verdict(c.mean, docs)} |")
    return "\n".join(lines)


def _ci(i: Interval) -> str:
    return f"{pts(i.estimate, True)} [{pts(i.low, True)}, {pts(i.high, True)}]"


def comparison_table(comparisons: Sequence[PairedComparison]) -> str:
    """Rows = comparisons, columns = tasks and the mean: difference [CI] in points."""
    tasks = sorted({t for c in comparisons for t in c.per_task})
    lines = ["| difference (points) | " + " | ".join(tasks) + " | mean | p (mean) |",
             "|---|" + "---:|" * (len(tasks) + 2)]
    for c in comparisons:
        cells = [_ci(c.per_task[t]) if t in c.per_task else "-" for t in tasks]
        lines.append(f"| {c.a} − {c.b} | " + " | ".join(cells) + f" | {_ci(c.mean)} | {c.mean.p_two_sided:.3f} |")
    return "\n".join(lines)


def reading(c: PairedComparison) -> str:
    """One honest sentence per comparison, then the tasks whose interval excludes 0."""
    level = f"{100 * c.confidence:.0f}%"
    m = c.mean
    if m.within_noise:
        head = (f"**{c.a} − {c.b}**: mean difference {pts(m.estimate, True)} points, {level} CI "
                f"[{pts(m.low, True)}, {pts(m.high, True)}] — the interval contains 0, so this difference is "
                "within noise at this sample size.")
    else:
        side = "better" if m.estimate > 0 else "worse"
        head = (f"**{c.a} − {c.b}**: mean difference {pts(m.estimate, True)} points, {level} CI "
                f"[{pts(m.low, True)}, {pts(m.high, True)}] — {c.a} is {side} than {c.b} on the five-task mean, "
                f"and the interval excludes 0 (bootstrap p = {m.p_two_sided:.3f}).")
    clear = [f"{t} ({pts(i.estimate, True)})" for t, i in c.per_task.items() if not i.within_noise]
    if clear:
        tail = " Tasks whose own interval excludes 0: " + ", ".join(clear) + "."
        if len(c.per_task) > 1:
            tail += (f" With {len(c.per_task)} tasks tested at {level} each, about "
                     f"{len(c.per_task) * (1 - c.confidence):.2f} such task-level results are expected by chance.")
    else:
        tail = " No single task's interval excludes 0."
    return head + tail


@dataclass
class StudyReport:
    title: str
    setup: list[str]  # bullet lines
    samples: dict[str, dict[str, TaskSamples]]  # model -> task -> samples
    comparisons: list[PairedComparison]
    hashes: dict[str, str]
    training: str = ""  # optional Markdown (e.g. last-step NLLs per strategy)
    notes: list[str] = field(default_factory=list)  # extra reading lines (caveats)

    def markdown(self) -> str:
        c0 = self.comparisons[0] if self.comparisons else None
        out = [f"# {self.title}", "", "## Setup", ""]
        out += [f"- {line}" for line in self.setup]
        out += ["", "## Results", "", ("Headline metric per benchmark, in percent, on the same seeded examples for "
                                       "every model; the mean is the plain average of the five."),
                "", score_table(self.samples), ""]
        if self.comparisons:
            out += ["## Paired differences", "",
                    (f"Difference in points with its {100 * c0.confidence:.0f}% paired bootstrap interval "
                     f"({c0.n_boot} replicates, examples resampled within each task (and TyDiQA language), "
                     "the same draw for both models)."), "", comparison_table(self.comparisons), ""]
        if self.training:
            out += ["## Training", "", self.training, ""]
        out += ["## Reading", ""]
        out += [f"- {reading(c)}" for c in self.comparisons]
        out += [f"- {n}" for n in self.notes]
        out += ["", "## Provenance", "", "| what | hash |", "|---|---|"]
        out += [f"| {k} | `{v}` |" for k, v in self.hashes.items()]
        return "\n".join(out) + "\n"
