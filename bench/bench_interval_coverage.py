"""Coverage of the seed x example intervals (forgetting_ray.report.study.seeds_by_examples) on simulated studies
with known variance components, beside the bootstrap the study report used before (seeds drawn with
replacement, then the examples drawn anew for each drawn seed).

A simulated study: training seeds x 40 examples of each of two tasks (the second in two languages), differences
d = seed offset (shared by both tasks, plus a small per-task part) + example effect (shared by every seed)
+ residual, true mean 0. Coverage = the share of studies whose 95 % interval of the mean contains 0;
with 1000 studies its simulation error is about +-0.7 points.

    .venv/bin/python bench/bench_interval_coverage.py --out bench/results/interval_coverage.json
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from forgetting_ray.report.study import seeds_by_examples  # noqa: E402

# (seeds, seed sd, example sd, residual sd)
SETTINGS = [(3, 0.4, 1.0, 0.7), (3, 1.0, 0.3, 0.5), (3, 0.0, 1.0, 0.7), (5, 0.3, 1.0, 1.0), (2, 0.5, 1.0, 0.5)]


def simulated_study(rng, n_seeds, seed_sd, example_sd, residual_sd, n_a=40, n_b=40):
    shared = rng.normal(0, seed_sd, size=(n_seeds, 1))

    def task(n):
        return (shared + rng.normal(0, 0.2 * seed_sd, (n_seeds, 1)) + rng.normal(0, example_sd, (1, n))
                + rng.normal(0, residual_sd, (n_seeds, n)))

    return {"A": (task(n_a), np.array([""] * n_a)), "B": (task(n_b), np.array(["en"] * (n_b // 2) + ["fi"] * (n_b // 2)))}


def former_bootstrap(diffs, rng, n_boot):
    """The former scheme: per replicate the seeds with replacement (shared by the tasks), then for each drawn
    seed the examples anew within each stratum; percentile interval of the mean over tasks."""
    n_seeds = next(iter(diffs.values()))[0].shape[0]
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    task_reps = []
    for d, g in diffs.values():
        names = np.unique(g)
        reps = np.zeros(n_boot)
        for name in names:
            dg = d[:, g == name]
            for slot in range(n_seeds):
                draw = rng.integers(0, dg.shape[1], size=(n_boot, dg.shape[1]))
                reps += dg[seeds[:, slot][:, None], draw].mean(axis=1) / n_seeds / len(names)
        task_reps.append(reps)
    return np.quantile(np.mean(task_reps, axis=0), [0.025, 0.975])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=1000, help="simulated studies per setting")
    p.add_argument("--n-boot", type=int, default=1000, help="replicates of the former bootstrap")
    p.add_argument("--out", default=None, help="raw figures (JSON)")
    args = p.parse_args(argv)
    rows = []
    for n_seeds, seed_sd, example_sd, residual_sd in SETTINGS:
        rng = np.random.default_rng(12345)
        crossed = former = 0
        for _ in range(args.studies):
            diffs = simulated_study(rng, n_seeds, seed_sd, example_sd, residual_sd)
            m = seeds_by_examples(diffs).mean
            crossed += m.low <= 0.0 <= m.high
            low, high = former_bootstrap(diffs, rng, args.n_boot)
            former += low <= 0.0 <= high
        rows.append({"seeds": n_seeds, "seed_sd": seed_sd, "example_sd": example_sd, "residual_sd": residual_sd,
                     "studies": args.studies, "coverage_crossed_t": crossed / args.studies,
                     "coverage_former_bootstrap": former / args.studies})
    print("| seeds | seed sd | example sd | residual sd | crossed t (now) | former bootstrap |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seeds']} | {r['seed_sd']:g} | {r['example_sd']:g} | {r['residual_sd']:g} | "
              f"{r['coverage_crossed_t']:.1%} | {r['coverage_former_bootstrap']:.1%} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"date": date.today().isoformat(), "command": "python "
                                              "bench/bench_interval_coverage.py " + " ".join(argv or sys.argv[1:]),
                                              "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
