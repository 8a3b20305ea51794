"""The fault-injection hooks of the recovery tests (faults.py): their grammar and the training hook's
one-shot crash, hold and release, without a cluster."""

from __future__ import annotations

import time

import pytest

from forgetting_ray.faults import maybe_crash_after_step, parse_score_fault, parse_train_fault


def test_score_fault_parsing():
    assert parse_score_fault("exit_after_shards=3") == 3
    assert parse_score_fault(None) is None
    with pytest.raises(ValueError, match="exit_after_shards"):
        parse_score_fault("after=3")


def test_train_fault_parsing():
    assert parse_train_fault(None) is None
    assert parse_train_fault("rank=1,after_step=3,marker=/tmp/m") == {"rank": 1, "after_step": 3, "marker": "/tmp/m",
                                                                      "hold_s": 0.0}
    assert parse_train_fault("rank=0,after_step=4,marker=/tmp/m,hold_s=90")["hold_s"] == 90.0
    with pytest.raises(ValueError, match="lacks marker"):
        parse_train_fault("rank=1,after_step=3")


def test_an_item_without_a_value_is_refused():
    with pytest.raises(ValueError, match="FORGETTING_RAY_INJECT_FAULT=.*'hold_s:5' is not key=value"):
        parse_train_fault("rank=1,after_step=3,marker=/tmp/m,hold_s:5")


def test_a_hold_writes_the_marker_once_and_ends_on_release(tmp_path):
    marker = tmp_path / "m" / "held"
    fault = parse_train_fault(f"rank=1,after_step=2,marker={marker},hold_s=30")
    maybe_crash_after_step(fault, rank=0, step_done=2)  # another rank
    maybe_crash_after_step(fault, rank=1, step_done=1)  # another step
    assert not marker.exists()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "held.release").touch()
    t0 = time.monotonic()
    maybe_crash_after_step(fault, rank=1, step_done=2)
    assert time.monotonic() - t0 < 5 and marker.read_text() == "held after step 2\n"
    marker.write_text("seen")
    maybe_crash_after_step(fault, rank=1, step_done=2)  # once only: the restarted worker passes
    assert marker.read_text() == "seen"
