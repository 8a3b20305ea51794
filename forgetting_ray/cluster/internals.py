"""The one place that reaches into Ray's private APIs, for two purposes: cleaning up after a Tune trial whose
process died or that ASHA stopped mid-fit, and keeping Ray Data's stats actor off the worker nodes of an
autoscaling cluster (:func:`pin_ray_data_stats_to_driver`).

Such a trial dies with its Ray Train controller, and Ray Train's own detached cleaner may then miss the
workers' placement group, which would hold the trial's CPUs until the driver exits (and a restarted trial,
``tune.max_trial_failures``, would wait for them forever).  A worker-group callback records each of the
trial's controllers in Ray's internal KV store before the controller creates its placement group
(``ray.train.v2._internal`` callback API, ``ray.experimental.internal_kv``); the driver later removes every
placement group a dead recorded controller created (``ray._private.state``, the GCS's table).  Written
against Ray 2.60; if these private APIs move, only this module changes.
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

    class ControllerRecorder(WorkerGroupCallback):
        """Appends this Train controller's actor id to the trial's record in Ray's KV store, for
        :class:`TrialReaper`, before the controller creates the workers' placement group: a trial killed at
        any point after that leaves a group the reaper can find.

        Ray Train's own detached cleaner removes the group of a dead controller too, but it finds the
        cluster through the State API, which fails where several Ray instances share a host; a leaked
        group holds its CPUs/GPUs for the rest of the search.  A trial's attempts run one after another, so
        the read-modify-write of its record does not race.
        """

        def __init__(self, trial_id: str):
            self.trial_id = trial_id

        def before_worker_group_start(self, worker_group_context) -> None:
            import ray
            from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

            try:
                raw = _internal_kv_get(self.trial_id, namespace=PG_KV_NAMESPACE)
                controllers = json.loads(raw) if raw else []
                me = ray.get_runtime_context().get_actor_id()
                if me not in controllers:
                    controllers.append(me)
                    _internal_kv_put(self.trial_id, json.dumps(controllers), overwrite=True,
                                     namespace=PG_KV_NAMESPACE)
            except Exception as e:  # noqa: BLE001 - bookkeeping must never fail a trial
                log.warning("could not record the Train controller of trial %s: %s", self.trial_id, e)

    return ControllerRecorder


def _placement_groups_created_by(actor_id: str) -> list:
    """The placement groups, not yet removed, that actor ``actor_id`` (hex) created: straight from the
    GCS's table, since the public table leaves out the creator."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    groups = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        row = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if row.creator_actor_id.hex() == actor_id and row.state != gcs_pb2.PlacementGroupTableData.REMOVED:
            groups.append(ray.PlacementGroupID(row.placement_group_id))
    return groups


def reaper_class():
    from ray.tune import Callback

    class TrialReaper(Callback):
        """Driver side: once a trial's Train controller is dead (the trial finished, was stopped, errored or
        is being restarted), remove the placement groups that controller created and left behind (a no-op
        wherever Ray Train's own cleaner worked)."""

        def __init__(self, wait_s: float = 120.0):
            self.wait_s = wait_s
            self.threads: list[threading.Thread] = []
            self.restarts: dict[str, int] = {}  # trial id -> how many times Tune restarted it in this driver

        def _reap(self, trial_id: str) -> None:
            from ray._private.state import actors
            from ray.experimental.internal_kv import _internal_kv_get
            from ray.util.placement_group import PlacementGroup, remove_placement_group

            reaped: set[str] = set()
            deadline = time.monotonic() + self.wait_s
            while time.monotonic() < deadline:
                raw = _internal_kv_get(trial_id, namespace=PG_KV_NAMESPACE)
                controllers = json.loads(raw) if raw else []
                for controller in controllers:
                    if controller in reaped or actors(controller).get("State") != "DEAD":
                        continue  # a restarted trial's live controller: its own end reaps it
                    for pg in _placement_groups_created_by(controller):
                        log.info("tune: removing the placement group %s left by trial %s", pg.hex(), trial_id)
                        try:
                            remove_placement_group(PlacementGroup(pg))
                        except Exception as e:  # noqa: BLE001 - removed meanwhile (another attempt's reaper)
                            log.debug("placement group %s: %s", pg.hex(), e)
                    reaped.add(controller)
                if controllers and reaped.issuperset(controllers):
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

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.restarts[trial.trial_id] = self.restarts.get(trial.trial_id, 0) + 1
            # the dead attempt's workers may hold the CPUs its restart needs
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
