"""Where the suite's time goes: per-test seconds (setup + call + teardown) grouped by what costs them.

    python -m pytest tests/ --junitxml=run.xml          # any run of the suite
    python tests/timings/summarize.py run.xml --csv tests/timings/NAME.csv   # keep the raw figures
    python tests/timings/summarize.py tests/timings/before.csv tests/timings/after.csv   # the table(s)

Each test is charged to the first cause whose pattern its id matches; the tables in tests/README.md are
this script's output on the CSV files beside it.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

# (cause, regex on "path::test"): first match wins
CAUSES = [
    ("multi-node cluster: 3 Ray nodes, S3, MLflow server, 5 `ray job submit`s", r"test_cluster_path\.py"),
    ("tiny pipeline in a fresh clone (own Ray cluster): run, report, reproduce", r"test_fresh_clone\.py"),
    ("Ray Tune searches (a Ray Train fit per trial)", r"integration/test_tune\.py::(?!.*mlflow_ui)"),
    ("Ray Train fits on the session cluster (DDP, ZeRO-2/3, LoRA)", r"integration/test_(train|export_zero3)\.py"),
    ("GPU-path rehearsals (own Ray cluster with a GPU slot; the one-process study)",
     r"test_gpu_check\.py|test_gpu_study\.py|test_plan\.py::test_gpu_check_without"),
    ("prepare -> partition studies on the tiny model (150-step references)",
     r"test_positive_controls\.py|test_noise_recovery\.py"),
    ("lm-eval agreement (two harnesses over 40 documents)", r"test_eval_agreement\.py"),
    ("headless Chromium + `mlflow server` start-ups", r"test_mlflow_ui\.py|test_report_browser\.py|mlflow_ui"),
    ("autoscaling cluster from zero workers (fake provider): a pipeline job and a Tune job, up and back down",
     r"test_autoscaling\.py"),
    ("Ray Data actor pools and other session-cluster tests", r"integration/"),
    ("real SmolLM2-135M: GGUF conversion and loads", r"smollm2|test_uncached_hub_dataset"),
    ("object store: retries against an endpoint that does not answer", r"test_store\.py::.*(unreachable|bad_endpoint)"),
    ("unit tests (no cluster)", r""),
]


def read(path: Path) -> dict[str, float]:
    """``{test id: seconds}`` from a pytest JUnit XML file or a CSV written by ``--csv``."""
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return {row["test"]: float(row["seconds"]) for row in csv.DictReader(f)}
    out: dict[str, float] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.attrib["classname"].replace(".", "/") + ".py"
        out[f"{module}::{case.attrib['name']}"] = float(case.attrib["time"])
    return out


def cause_of(test: str) -> str:
    return next(name for name, pattern in CAUSES if re.search(pattern, test))


def grouped(times: dict[str, float]) -> dict[str, tuple[float, int]]:
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for test, s in times.items():
        g = sums[cause_of(test)]
        g[0] += s
        g[1] += 1
    return {name: tuple(sums[name]) for name, _ in CAUSES if name in sums}


def table(runs: dict[str, dict[str, float]]) -> str:
    names = list(runs)
    groups = {n: grouped(t) for n, t in runs.items()}
    head = "| cause | " + " | ".join(f"{n}: s (tests)" for n in names) + " |"
    lines = [head, "|---|" + "---:|" * len(names)]
    for cause, _ in CAUSES:
        cells = [f"{groups[n][cause][0]:.0f} ({groups[n][cause][1]})" if cause in groups[n] else "–" for n in names]
        lines.append(f"| {cause} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(t.values()):.0f}** ({len(t)})" for t in runs.values())
                 + " |")
    return "\n".join(lines)


def slowest(times: dict[str, float], n: int) -> str:
    rows = sorted(times.items(), key=lambda kv: -kv[1])[:n]
    return "\n".join(["| s | test |", "|---:|---|"] + [f"| {s:.1f} | `{t}` |" for t, s in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path, help="JUnit XML or CSV files, one column each")
    p.add_argument("--csv", type=Path, help="write the (single) input's per-test seconds as CSV")
    p.add_argument("--slowest", type=int, default=0, help="also list the N slowest tests of the last file")
    a = p.parse_args(argv)
    runs = {f.stem: read(f) for f in a.files}
    if a.csv:
        (only,) = runs.values()
        with open(a.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["test", "seconds"])
            w.writerows(sorted(only.items()))
    print(table(runs))
    if a.slowest:
        print()
        print(slowest(list(runs.values())[-1], a.slowest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
