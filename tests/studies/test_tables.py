"""The noise and control tables (forgetting_ray.studies.tables) rendered from a raw record of hand-made runs, and
every committed record (bench/results/noise/*.json) against BENCHMARKS.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from test_metrics import hand_made_view

from forgetting_ray.studies.experiments import ControlRun, NoiseRun
from forgetting_ray.studies.metrics import controls_report, recovery_report
from forgetting_ray.studies.tables import control_record, noise_record, render

REPO = Path(__file__).resolve().parents[2]


def _record() -> dict:
    view = hand_made_view(changed=np.array([0, 0, 0, 1, 0, 0, 0], bool),
                          nll_base=np.array([1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0], np.float32),
                          nll_ref=np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], np.float32))
    noise = NoiseRun("swap", 0.25, recovery_report(view), {"score": "k"}, view, {"score": 1.0})
    controls = ControlRun(controls_report(view, {"a": "planted", "b": "replaced"}, 0.7), {"score": "k"}, view,
                          {"a": "planted", "b": "replaced"}, {"score": 1.0})
    return {"args": {"rho": 0.7}, "noise": [noise_record(noise, 0.7)], "controls": control_record(controls)}


def test_tables_show_the_hand_made_runs_figures_and_survive_the_json_round_trip():
    record = _record()
    md = render(record)
    assert md == render(json.loads(json.dumps(record)))
    # score AUROC: token 0.8 (see test_metrics), token-exact 1.0, sample 1.0; half of the bad sample's tokens changed
    assert "| swap | 50% | 0.800 / 1.000 / 1.000 |" in md
    # the selections re-score from the NLLs: the changed token's difference 5 - 4 = +1 is the highest of the seven,
    # so it ranks last (AUROC 0) and stays out of every negative set; a random split would hold it 1 time in 7
    assert "| swap | difference (the paper's) | 0.000 | 0.000 | 0.143 | 0.000 |" in md
    # controls: sample "a" has no changed token (no planted rate), "b"'s changed token is negative
    assert "| partition (difference, the paper's) |  | 100.0% | 42.9% |" in md
    assert md.count("| the same scores shifted by one position |") == 1 and "| difference |" not in md



def test_every_committed_noise_table_is_in_the_benchmarks_document():
    records = sorted((REPO / "bench" / "results" / "noise").glob("*.json"))
    assert records, "no raw noise-study record committed under bench/results/noise/"
    doc = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    for path in records:
        rows = [line for line in render(json.loads(path.read_text(encoding="utf-8"))).splitlines()
                if line.startswith("| ") and not line.startswith("|---") and not line.startswith("| mode |")
                and not line.startswith("| scores |")]
        missing = [line for line in rows if line not in doc]
        assert not missing, f"{path.name}: {len(missing)} table rows differ from BENCHMARKS.md, e.g. {missing[:2]}"
