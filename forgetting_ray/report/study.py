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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
    p_two_sided: float  # bootstrap: 2 x the smaller tail share of replicates on either side of 0
    n: int  # examples (for the mean: total over tasks)

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
    n_boot: int


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
    """Percentile bootstrap of each task's difference and of their average.

    ``diffs``: task -> (differences, per-example stratum).  Each replicate resamples every stratum of
    every task with replacement (stratified, so a replicate keeps each language's and each task's size),
    computes each task's statistic and their mean.  The differences are per example, or per training seed
    and example (``[seeds, examples]``, the same seeds in the same order for every task): then each
    replicate first draws the seeds with replacement, once for all tasks (a seed is one pair of trained
    models), and then the examples anew for each drawn seed, as ``seed_example_bootstrap`` does.
    """
    if not diffs:
        raise StudyError("no tasks to compare")
    if not 0.0 < confidence < 1.0:
        raise StudyError(f"confidence must be in (0, 1), got {confidence}")
    arrays = {task: np.asarray(diffs[task][0], dtype=np.float64) for task in diffs}
    shapes = {d.shape[:-1] for d in arrays.values()}
    if len(shapes) > 1 or not {d.ndim for d in arrays.values()} <= {1, 2} or (0,) in shapes:
        raise StudyError("differences must all be per example, or all [seeds, examples] with the same seeds; got "
                         f"shapes {sorted(d.shape for d in arrays.values())}")
    rng = np.random.default_rng(seed)
    (lead,) = shapes
    seed_draws = rng.integers(0, lead[0], size=(n_boot, lead[0])) if lead else None
    per_task: dict[str, Interval] = {}
    task_reps = []
    for task in sorted(diffs):
        d, g = arrays[task], np.asarray(diffs[task][1])
        if d.size == 0:
            raise StudyError(f"{task}: no paired examples")
        names = np.unique(g)
        reps = np.zeros(n_boot)
        for name in names:
            reps += _stratum_replicates(d[..., g == name], seed_draws, rng, n_boot)
        reps /= len(names)
        per_task[task] = _interval(group_mean(d.reshape(-1, d.shape[-1]).mean(axis=0), g), reps, confidence,
                                   int(d.size))
        task_reps.append(reps)
    mean_reps = np.mean(task_reps, axis=0)
    mean_est = float(np.mean([per_task[t].estimate for t in per_task]))
    mean = _interval(mean_est, mean_reps, confidence, sum(i.n for i in per_task.values()))
    return PairedComparison(a, b, per_task, mean, confidence, n_boot)


def _stratum_replicates(d: np.ndarray, seed_draws: np.ndarray | None, rng: np.random.Generator,
                        n_boot: int) -> np.ndarray:
    """Bootstrap means of one stratum: ``d[examples]``, or ``d[seeds, examples]`` with each replicate's
    seeds already drawn (``seed_draws[replicate, slot]``) and the examples drawn here for every slot."""
    n_ex = d.shape[-1]
    if seed_draws is None:
        return d[rng.integers(0, n_ex, size=(n_boot, n_ex))].mean(axis=1)
    reps = np.zeros(n_boot)
    for slot in range(seed_draws.shape[1]):
        reps += d[seed_draws[:, slot][:, None], rng.integers(0, n_ex, size=(n_boot, n_ex))].mean(axis=1)
    return reps / seed_draws.shape[1]


def seed_example_bootstrap(values: np.ndarray, *, n_boot: int = 10_000, confidence: float = 0.95,
                           seed: int = 0) -> Interval:
    """Percentile interval of the mean of ``values[s, i]`` (training seed s, example i, the same examples
    for every seed) that covers both sources of chance: each replicate draws the seeds with replacement,
    then for each drawn seed the examples with replacement, and averages. With one seed it is the plain
    example bootstrap; the seed level is what a single run cannot measure."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or 0 in v.shape:
        raise StudyError(f"need a [seeds, examples] array with both sizes > 0, got shape {v.shape}")
    return paired_bootstrap({"": (v, np.zeros(v.shape[1]))}, n_boot=n_boot, confidence=confidence, seed=seed).mean


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
    and the examples (``paired_bootstrap`` on ``[seeds, examples]`` differences)."""
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
    return paired_bootstrap(diffs, a=a, b=b, **kwargs)


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
