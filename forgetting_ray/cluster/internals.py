"""The one place that reaches into Ray's private APIs, for two purposes: cleaning up after a Tune trial that
ASHA stopped mid-fit, and keeping Ray Data's stats actor off the worker nodes of an autoscaling cluster
(:func:`pin_ray_data_stats_to_driver`).

Such a trial is killed with its Ray Train controller, and Ray Train's own detached cleaner may then miss
the workers' placement group, which would hold the trial's CPUs until the driver exits.  A worker-group
callback records (trial, controller, placement group) in Ray's internal KV store
(``ray.train.v2._internal`` callback API, ``ray.experimental.internal_kv``); a reaper actor later removes
the placement groups whose controller is gone (``ray._private.state``).  Written against Ray 2.60; if
these private APIs move, only this module changes.
"""

from __future__ import annotations

import json
import logging
import threading
import time

log = logging.getLogger(__name__)

PG_KV_NAMESPACE = "forgetting_ray_tune"


def pg_recorder_class():
    # The classes subclass Ray's, so they are built on first use: importing this module (the tune stage
    # does) must not import ray.
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class PlacementGroupRecorder(WorkerGroupCallback):
        """Records (trial, controller, worker placement group) in Ray's KV store, for :class:`TrialReaper`.

        A trial that ASHA stops is killed mid-fit, and its Train controller dies with it.  Ray Train's
        own detached cleaner then removes the workers' placement group, but it finds the cluster
        through the State API, which fails where several Ray instances share a host; a leaked group
        holds its CPUs/GPUs for the rest of the search.  This record lets the driver reap it.
        """

        def __init__(self, trial_id: str):
            self.trial_id = trial_id

        def after_worker_group_start(self, worker_group) -> None:
            import ray
            from ray.experimental.internal_kv import _internal_kv_put

            try:
                pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
                value = json.dumps({"pg": pg.id.hex(), "controller": ray.get_runtime_context().get_actor_id()})
                _internal_kv_put(self.trial_id, value, overwrite=True, namespace=PG_KV_NAMESPACE)
            except Exception as e:  # noqa: BLE001 - bookkeeping must never fail a trial
                log.warning("could not record the placement group of trial %s: %s", self.trial_id, e)

    return PlacementGroupRecorder


def reaper_class():
    from ray.tune import Callback

    class TrialReaper(Callback):
        """Driver side: once a finished or stopped trial's Train controller is dead, remove its workers'
        placement group if it is still there (a no-op wherever Ray Train's own cleaner worked)."""

        def __init__(self, wait_s: float = 120.0):
            self.wait_s = wait_s
            self.threads: list[threading.Thread] = []

        def _reap(self, trial_id: str) -> None:
            import ray
            from ray._private.state import actors
            from ray.experimental.internal_kv import _internal_kv_get
            from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

            deadline = time.monotonic() + self.wait_s
            while time.monotonic() < deadline:
                raw = _internal_kv_get(trial_id, namespace=PG_KV_NAMESPACE)
                if raw is not None:
                    rec = json.loads(raw)
                    if actors(rec["controller"]).get("State") == "DEAD":
                        if placement_group_table().get(rec["pg"], {}).get("state") not in (None, "REMOVED"):
                            log.info("tune: removing the placement group %s left by trial %s", rec["pg"], trial_id)
                            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(rec["pg"]))))
                        return
                time.sleep(0.5)

        def _start(self, trial) -> None:
            th = threading.Thread(target=self._reap, args=(trial.trial_id,), daemon=True)
            th.start()
            self.threads.append(th)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._start(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._start(trial)

        def join(self) -> None:
            for th in self.threads:
                th.join()

    return TrialReaper


def pin_ray_data_stats_to_driver() -> None:
    """Create Ray Data's per-cluster stats actor from this (the driver's) process, so that it lives on the
    driver's node.

    The actor is detached and pinned to the node of the first process that uses Ray Data; when that is a
    training worker or a Tune trial on a worker node, the actor keeps that node busy for good and the
    autoscaler never removes it (seen with Ray 2.60's fake autoscaler: one worker node left after every
    job ended). Created here first, it sits on the head beside the job drivers.
    """
    from ray.data._internal.stats import get_or_create_stats_actor

    try:
        get_or_create_stats_actor()
    except Exception as e:  # noqa: BLE001 -- a private API: a Ray without it only loses this placement
        log.debug("Ray Data's stats actor not created from the driver: %s", e)
