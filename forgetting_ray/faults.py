"""Fault injection for the recovery tests: a one-shot failure, set through an environment variable, at a
point where a real job can die, so that a test exercises the resume and not a clean run.

Both variables hold comma-separated ``key=value`` items:

* ``FORGETTING_RAY_SCORE_FAULT=exit_after_shards=N``: the score driver dies hard (``os._exit`` with
  :data:`SCORE_FAULT_EXIT_CODE`) right after writing its N-th shard, exactly like a killed job: no cleanup,
  no marker.
* ``FORGETTING_RAY_INJECT_FAULT=rank=R,after_step=K,marker=PATH[,hold_s=S]``: training rank R exits once after
  optimizer step K (the marker file makes it once: the restarted worker passes that step).  With ``hold_s``
  the rank holds still for up to S seconds instead of exiting (a window for a test to kill its node, or to
  look at what the run has written so far); a file ``<marker>.release`` ends the hold early.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .store import join_storage, read_text

SCORE_FAULT_ENV = "FORGETTING_RAY_SCORE_FAULT"
SCORE_FAULT_EXIT_CODE = 17
TRAIN_FAULT_ENV = "FORGETTING_RAY_INJECT_FAULT"


def _settings(env: str, text: str) -> dict[str, str]:
    """``a=1,b=x`` -> {"a": "1", "b": "x"}; empty items are skipped."""
    items = [item for item in text.split(",") if item]
    malformed = [item for item in items if "=" not in item]
    if malformed:
        raise ValueError(f"{env}={text!r}: {malformed[0]!r} is not key=value")
    return dict(item.split("=", 1) for item in items)


def parse_score_fault(text: str | None) -> int | None:
    """``exit_after_shards=N`` -> N (see SCORE_FAULT_ENV)."""
    if not text:
        return None
    settings = _settings(SCORE_FAULT_ENV, text)
    if "exit_after_shards" not in settings:
        raise ValueError(f"{SCORE_FAULT_ENV}={text!r}: expected exit_after_shards=N")
    return int(settings["exit_after_shards"])


def parse_train_fault(text: str | None) -> dict[str, Any] | None:
    """``rank=1,after_step=3,marker=/tmp/x[,hold_s=S]`` -> dict (see TRAIN_FAULT_ENV)."""
    if not text:
        return None
    settings = _settings(TRAIN_FAULT_ENV, text)
    try:
        return {"rank": int(settings["rank"]), "after_step": int(settings["after_step"]),
                "marker": settings["marker"], "hold_s": float(settings.get("hold_s", 0))}
    except KeyError as e:
        raise ValueError(
            f"{TRAIN_FAULT_ENV}={text!r} lacks {e.args[0]} (want rank=..,after_step=..,marker=..)"
        ) from None


def maybe_exit_after_shards(exit_after: int | None, shards_written: int) -> None:
    """The score driver's hook, called after each shard it writes."""
    if exit_after is not None and shards_written >= exit_after:
        os._exit(SCORE_FAULT_EXIT_CODE)  # simulated kill: nothing after this runs


def _has_registered_checkpoint(run_storage: str) -> bool:
    try:
        snapshot = json.loads(read_text(join_storage(run_storage, "checkpoint_manager_snapshot.json")))
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return False
    return bool(snapshot.get("checkpoint_results"))


def maybe_crash_after_step(fault: dict[str, Any] | None, rank: int, step_done: int) -> None:
    """The training worker's hook, called after each optimizer step (and its report).

    ``fault["run_storage"]``, set by the driver, is the Ray Train run folder whose checkpoint the crash waits for.
    """
    if not fault or fault["rank"] != rank or fault["after_step"] != step_done:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return  # one crash only: the restarted worker passes this step
    # Ray Train registers a checkpoint only once every rank's report of it has been polled (every
    # 2 s); crash after that, so the test exercises a resume and not a restart from scratch.
    deadline = time.monotonic() + 60
    while fault.get("run_storage") and time.monotonic() < deadline and not _has_registered_checkpoint(
        fault["run_storage"]
    ):
        time.sleep(0.2)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{'held' if fault.get('hold_s') else 'crashed'} after step {step_done}\n")
    if fault.get("hold_s"):
        release, until = Path(f"{marker}.release"), time.monotonic() + fault["hold_s"]
        while time.monotonic() < until and not release.exists():
            time.sleep(0.2)
        return
    os._exit(1)
