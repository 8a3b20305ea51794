"""The search's Ray callbacks, written as plain classes of hooks.

* :class:`TrialReport` (Ray Train, in each trial's fit): forwards training reports to Tune with
  ``online_nll``, the signal ASHA compares trials on;
* :class:`TrialProgress` (Ray Tune, on the driver): the search's progress bar;
* :class:`PendingTrialWatch` (Ray Tune, on the driver): stops a search whose trials cannot be placed;
* :class:`~forgetting_ray.tuning.trial_tracker.TrialTracker` (Ray Tune, on the driver): the trials' MLflow
  runs, in a module of its own because it loads models and plots.

Ray accepts only instances of its own callback classes, but importing Ray takes seconds and the pipeline
imports the tune stage for runs without a search too.  So these classes do not subclass Ray's: the
search builds them with :func:`trial_report_callback` and :func:`tune_callback`, which import Ray and
mix its base class in.  Each trial's Train controller imports this module to unpickle its
:class:`TrialReport`, so it stays light (no torch).
"""

from __future__ import annotations

import functools
import math
import time
import types
from collections import deque
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from ..cluster.capacity import placement_timeout_error
from ..search import OBJECTIVE_METRIC, ONLINE_METRIC, TRIAL_CPUS, online_nll

Hooks = TypeVar("Hooks")


@functools.cache  # one class per pair: every instance shares one type
def _with_ray_base(hooks: type, base: type) -> type:
    """``hooks`` subclassed together with Ray's ``base`` (hooks first, so that they override the base's)."""
    return types.new_class(hooks.__name__, (hooks, base), exec_body=lambda ns: ns.update(
        __module__=hooks.__module__, __qualname__=hooks.__qualname__, __doc__=hooks.__doc__))


def tune_callback(hooks: type[Hooks], *args: Any, **kwargs: Any) -> Hooks:
    """An instance of ``hooks`` that is also a ``ray.tune.Callback``, for ``RunConfig(callbacks=...)``."""
    from ray.tune import Callback

    return _with_ray_base(hooks, Callback)(*args, **kwargs)


def trial_report_callback(window: int = 2) -> TrialReport:
    """A :class:`TrialReport` that is also Ray Train's ``TuneReportCallback``, for a trial's fit."""
    from ray.tune.integration.ray_train import TuneReportCallback

    return _with_ray_base(TrialReport, TuneReportCallback)(window)


class TrialReport:
    """Forwards rank 0's training reports to Tune with ``online_nll`` added (the driver's
    :class:`~forgetting_ray.tuning.trial_tracker.TrialTracker` logs them to MLflow).

    Runs in the Ray Train controller of the trial's fit.  ``online_nll`` is averaged over the last
    ``window`` reports, so one unlucky micro-batch does not decide a rung.
    """

    def __init__(self, window: int = 2):
        super().__init__()
        self.recent: deque[float] = deque(maxlen=window)

    def after_report(self, run_context, metrics, checkpoint):
        m = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        value = online_nll(m)
        if value is not None and math.isfinite(value):
            self.recent.append(value)
            m["online_nll_step"] = value
        if self.recent:
            m[ONLINE_METRIC] = float(np.mean(self.recent))
        super().after_report(run_context, [m], checkpoint)


class TrialProgress:
    """The search's bar on the driver: trials ended (finished, stopped early, failed) of all, how many run
    now, and the best objective so far."""

    def __init__(self, total: int, mode: str):
        self.total, self.mode, self.best, self.bar = total, mode, None, None

    def _show(self, trials) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.total, desc="tune", unit="trial", mininterval=1.0, dynamic_ncols=True)
        ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        self.bar.update(ended - self.bar.n)
        best = "-" if self.best is None else f"{self.best:.4g}"
        self.bar.set_postfix_str(f"running={sum(t.status == 'RUNNING' for t in trials)} best={best}")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._show(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(OBJECTIVE_METRIC)
        if value is None:
            return
        if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
            self.best = float(value)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._show(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._show(trials)

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self._show(trials)
            self.bar.close()


class PendingTrialWatch:
    """Tune keeps a trial it cannot place PENDING forever: when trials are pending and none runs for longer
    than resources.placement_timeout_s, stop the search, naming the demand."""

    def __init__(self, timeout_s: float):
        self.timeout_s, self.idle_since = timeout_s, None

    def on_step_begin(self, iteration, trials, **info):
        if any(t.status == "RUNNING" for t in trials) or not any(t.status == "PENDING" for t in trials):
            self.idle_since = None
            return
        self.idle_since = self.idle_since or time.monotonic()
        if time.monotonic() - self.idle_since > self.timeout_s:
            import ray

            raise placement_timeout_error(f"Tune trials (each holding {TRIAL_CPUS:g} CPU while its fit runs)",
                                          "tune.max_concurrent_trials", self.timeout_s, ray)
