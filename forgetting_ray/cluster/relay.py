"""Each optimizer step's metrics, from rank 0 to the driver while the fit runs."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator


class _StepRelay:
    """A mailbox actor: rank 0 puts each optimizer step's metrics, the driver takes them."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def put(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def take(self) -> list[dict[str, Any]]:
        rows, self.rows = self.rows, []
        return rows


@contextmanager
def step_relay(on_step: Callable[[dict[str, Any]], None] | None, poll_s: float = 1.0) -> Iterator[str | None]:
    """While a fit runs, hand every step's metrics to ``on_step`` in this (the driver) process, as they come:
    the MLflow server need only be reachable from the driver, and a long run shows its curves live.

    Yields the name of a relay actor for rank 0 to send to (None, and no actor, without ``on_step``); a
    failing ``on_step`` (MLflow down) is logged once and never stops the fit."""
    if on_step is None:
        yield None
        return
    import threading
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = f"forgetting-ray-steps-{uuid.uuid4().hex[:12]}"
    # on the driver's node: a worker node lost mid-fit must not take the relay with it
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    relay = ray.remote(num_cpus=0)(_StepRelay).options(name=name, scheduling_strategy=here).remote()
    stop, problems = threading.Event(), []

    def warn_once(what: str, e: Exception) -> None:
        if not problems:
            logging.getLogger(__name__).warning("live step metrics: %s (%s); the rest are logged after the fit", what, e)
        problems.append(e)

    def drain() -> None:
        if problems and isinstance(problems[0], ray.exceptions.RayActorError):
            return  # the relay is gone: the steps come back with the fit's result instead
        try:
            rows = ray.get(relay.take.remote())
        except ray.exceptions.RayActorError as e:
            warn_once("the relay actor died", e)
            return
        for row in rows:
            try:
                on_step(row)
            except Exception as e:  # noqa: BLE001 - live metrics are a view; the fit goes on
                warn_once("not logged", e)

    def pump() -> None:
        while not stop.wait(poll_s):
            drain()

    thread = threading.Thread(target=pump, name="step-relay", daemon=True)
    thread.start()
    try:
        yield name
    finally:
        stop.set()
        thread.join()
        drain()  # the last steps
        ray.kill(relay)
