"""The noise and control studies' results as Markdown tables, rendered from their raw record (the JSON
bench/bench_noise_recovery.py writes), so a table in BENCHMARKS.md can be regenerated and diffed."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .metrics import noise_variants

if TYPE_CHECKING:  # pragma: no cover
    from .experiments import ControlRun, NoiseRun

SIGNALS = {"score": "score (difference)", "-nll_base": "−NLL_base", "-nll_ref": "−NLL_ref", "random": "random"}
SELECTIONS = {"difference": "difference (the paper's)", "relative": "relative", "prob_gain": "prob_gain",
              "zscore": "zscore (per sequence)", "base_nll_floor 0.5": "difference + base-NLL floor 0.5",
              "bottom 15% negative": "three-way, bottom 15 % negative"}


def noise_record(run: NoiseRun, rho: float) -> dict[str, Any]:
    """What one noise run's tables need, as plain JSON (the token view itself stays out: it is large)."""
    return {"mode": run.mode, "fraction": run.fraction, "keys": run.keys, "seconds": run.seconds,
            "report": run.report, "selections": noise_variants(run.view, rho)}


def control_record(run: ControlRun) -> dict[str, Any]:
    return {"keys": run.keys, "seconds": run.seconds, "report": run.report}


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def noise_tables(runs: Sequence[Mapping[str, Any]], rho: float) -> str:
    """Each signal's AUROC (token / token-exact / sample), then each selection option's negative set on the
    tokens whose characters changed, beside a random split of the same size."""
    head = "| mode | changed share of a corrupted sample's tokens | " + " | ".join(SIGNALS.values()) + " |"
    out = [f"AUROC, token / token-exact / sample (1 = corrupted below clean, 0.5 = chance), ρ = {rho}:", "",
           head, "|---|---:|" + "---|" * len(SIGNALS)]
    for r in runs:
        a = r["report"]["auroc"]
        cells = [" / ".join(_num(a[s].get(k)) or "–" for k in ("token", "token_exact", "sample")) if s in a else ""
                 for s in SIGNALS]
        out.append(f"| {r['mode']} | {_num(r['report'].get('changed_share_of_bad_samples'), '.0%')} | "
                   + " | ".join(cells) + " |")
    out += ["", f"Negative set (bottom {1 - rho:.0%}) on the changed tokens:", "",
            "| mode | selection | AUROC token-exact | precision | random precision | recall |",
            "|---|---|---:|---:|---:|---:|"]
    for r in runs:
        for name, v in r["selections"].items():
            out.append(f"| {r['mode']} | {SELECTIONS.get(name, name)} | {_num(v.get('auroc_exact'))} | "
                       f"{_num(v['precision'])} | {_num(v['random_precision'])} | {_num(v['recall'])} |")
    return "\n".join(out)


def controls_table(report: Mapping[str, Any]) -> str:
    """Planted sentence tokens that are positive (goal ≥ 90 %), unseen replacement tokens that are negative
    (goal: well above the base rate), for the partition's split, the same scores shifted by one position and
    each selection option."""
    rows = [("partition (difference, the paper's)", report["partition"]),
            ("the same scores shifted by one position", report["shifted_by_one"])]
    rows += [(SELECTIONS.get(k, k), v) for k, v in report["variants"].items() if k != "difference"]
    out = ["| scores | planted tokens positive | replacement tokens negative | negative base rate |",
           "|---|---:|---:|---:|"]
    out += [f"| {name} | {_num(r['planted_positive'], '.1%')} | {_num(r['replaced_negative'], '.1%')} | "
            f"{_num(r['base_rate_negative'], '.1%')} |" for name, r in rows]
    return "\n".join(out)


def render(record: Mapping[str, Any]) -> str:
    """Every table of one bench_noise_recovery run, from its raw record."""
    rho = record["args"]["rho"]
    parts = []
    if record["noise"]:
        parts.append(noise_tables(record["noise"], rho))
    if record.get("controls"):
        parts.append("Positive controls:\n\n" + controls_table(record["controls"]["report"]))
    return "\n\n".join(parts) + "\n"
