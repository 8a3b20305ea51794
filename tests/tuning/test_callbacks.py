"""The search's callbacks as plain classes of hooks (no Ray session), and built on Ray's bases."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from forgetting_ray.search import OBJECTIVE_METRIC, ONLINE_METRIC
from forgetting_ray.tuning.callbacks import PendingTrialWatch, TrialProgress, TrialReport, tune_callback


class Forwarded:
    """Stands in for Ray Train's TuneReportCallback: keeps what TrialReport forwards."""

    def after_report(self, run_context, metrics, checkpoint):
        self.forwarded = metrics


class Report(TrialReport, Forwarded):
    pass


def test_trial_report_adds_the_online_nll_averaged_over_its_window():
    report = Report(window=2)
    report.after_report(None, [{"n_pos": 0, "n_neg": 0, "lr": 1e-3, "flag": True, "name": "x"}], None)
    assert report.forwarded == [{"n_pos": 0, "n_neg": 0, "lr": 1e-3}]  # numbers only, no NLL yet
    steps = [{"n_pos": 3, "n_neg": 1, "pos_nll": 2.0, "neg_nll": 6.0},  # (3*2 + 6) / 4 = 3
             {"n_pos": 1, "n_neg": 0, "pos_nll": 5.0, "neg_nll": 0.0},  # 5
             {"n_pos": 0, "n_neg": 2, "pos_nll": 0.0, "neg_nll": 1.0}]  # 1
    report.after_report(None, [steps[0]], None)
    assert report.forwarded[0]["online_nll_step"] == 3.0 and report.forwarded[0][ONLINE_METRIC] == 3.0
    report.after_report(None, [steps[1]], None)
    assert report.forwarded[0][ONLINE_METRIC] == 4.0
    report.after_report(None, [steps[2]], None)
    assert report.forwarded[0][ONLINE_METRIC] == 3.0  # the first step left the window


@pytest.mark.parametrize("mode, best", [("min", 0.5), ("max", 2.0)])
def test_trial_progress_keeps_the_best_objective(mode, best):
    progress = TrialProgress(total=3, mode=mode)
    for result in ({OBJECTIVE_METRIC: 1.0}, {ONLINE_METRIC: 0.1}, {OBJECTIVE_METRIC: 2.0}, {OBJECTIVE_METRIC: 0.5}):
        progress.on_trial_result(0, [], None, result)
    assert progress.best == best


def test_tune_callback_is_a_ray_tune_callback_with_the_hooks():
    from ray.tune import Callback

    watch = tune_callback(PendingTrialWatch, timeout_s=60)
    assert isinstance(watch, Callback) and isinstance(watch, PendingTrialWatch)
    assert type(watch) is type(tune_callback(PendingTrialWatch, 1))  # one class, however often built
    watch.on_step_begin(0, [SimpleNamespace(status="PENDING")])  # pending, within the timeout
    assert watch.idle_since is not None
    watch.on_step_begin(1, [SimpleNamespace(status="RUNNING")])
    assert watch.idle_since is None
