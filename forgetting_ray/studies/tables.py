"""The study's results as the plain-text tables bench/bench_noise_recovery.py prints (and BENCHMARKS.md quotes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .metrics import noise_variants

if TYPE_CHECKING:  # pragma: no cover
    from .experiments import ControlRun, NoiseRun


def format_runs(runs: Sequence[NoiseRun], rho: float) -> str:
    """Plain-text tables: the negative set per run, then each signal's AUROC beside the score's baselines."""
    head = (f"{'mode':<14} {'frac':>5} {'bad tok':>8} {'changed':>8} {'neg prec':>8} {'exact':>6} {'(random)':>8} "
            f"{'neg rec':>8} {'exact':>6} {'(random)':>8} {'score clean':>11} {'score bad':>9}")
    lines = [f"rho = {rho}: negatives = bottom {1 - rho:.0%} of scores; random = a random split of the same sizes; "
             "'bad' = every token of a corrupted sample, 'changed'/'exact' = only the tokens whose characters changed",
             head, "-" * len(head)]
    nan = float("nan")
    for r in runs:
        m = r.report
        lines.append(
            f"{r.mode:<14} {r.fraction:>5.2f} {m['bad_token_share']:>8.3f} {m.get('changed_token_share', nan):>8.3f} "
            f"{m['neg_precision']:>8.3f} {m.get('exact_neg_precision', nan):>6.3f} {m['neg_random_precision']:>8.3f} "
            f"{m['neg_recall']:>8.3f} {m.get('exact_neg_recall', nan):>6.3f} {m['neg_random_recall']:>8.3f} "
            f"{m['mean_score_clean']:>11.3f} {m['mean_score_bad']:>9.3f}")
    head = f"{'mode':<14} {'signal':<10} {'AUROC token':>11} {'token exact':>11} {'sample':>7}"
    lines += ["", "AUROC (1 = corrupted below clean, 0.5 = chance) of the score and of the baselines it must beat",
              head, "-" * len(head)]
    for r in runs:
        for signal, a in r.report["auroc"].items():
            lines.append(f"{r.mode:<14} {signal:<10} {a['token']:>11.3f} {a.get('token_exact', nan):>11.3f} "
                         f"{a['sample']:>7.3f}")
    return "\n".join(lines)


def format_controls(run: ControlRun, rho: float) -> str:
    head = f"{'scores':<22} {'planted +':>10} {'replaced -':>11} {'base rate -':>12}"
    lines = [f"positive controls at rho = {rho}: planted sentence tokens that are positive (goal >= 90 %), unseen "
             "replacement tokens that are negative (goal: well above the base rate)", head, "-" * len(head)]
    rows = [("partition (difference)", run.report["partition"]), ("shifted by one", run.report["shifted_by_one"])]
    rows += [(f"variant {k}", v) for k, v in run.report["variants"].items()]
    for name, r in rows:
        lines.append(f"{name:<22} {r['planted_positive']:>10.1%} {r['replaced_negative']:>11.1%} "
                     f"{r['base_rate_negative']:>12.1%}")
    return "\n".join(lines)


def format_noise_variants(runs: Sequence[NoiseRun], rho: float) -> str:
    """Each selection option on each noise run: token-exact AUROC of its score, its negatives' precision
    and recall on the changed tokens (random: precision = the changed share)."""
    head = f"{'mode':<14} {'selection':<24} {'AUROC exact':>11} {'neg prec':>8} {'(random)':>8} {'neg rec':>8}"
    lines = [f"selection options at rho = {rho} on the changed tokens", head, "-" * len(head)]
    for r in runs:
        for name, v in noise_variants(r.view, rho).items():
            lines.append(f"{r.mode:<14} {name:<24} {v.get('auroc_exact', float('nan')):>11.3f} {v['precision']:>8.3f} "
                         f"{v['random_precision']:>8.3f} {v['recall']:>8.3f}")
    return "\n".join(lines)
