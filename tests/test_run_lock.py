"""One run per run_dir (forgetting_ray.run_lock): on local disk and in a bucket (moto), two runs at once, a dead
holder, a stale one, and the heartbeat."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import pytest

from forgetting_ray.errors import UserError
from forgetting_ray.run_lock import LOCAL_LOCK, Holder, RunDirBusy, hold_run_dir


def _gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_on_a_held_folder_stops_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    with hold_run_dir(run_dir) as me:
        with pytest.raises(RunDirBusy) as err:
            with hold_run_dir(run_dir):
                pytest.fail("two runs held one run_dir")
        assert isinstance(err.value, UserError)
        msg = str(err.value)
        assert str(run_dir) in msg and f"pid {me.pid}" in msg and socket.gethostname() in msg and me.started_at in msg
    assert not (run_dir / LOCAL_LOCK).exists()  # released at the end
    with hold_run_dir(run_dir):  # and free again
        pass


def _write_lock(run_dir, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {**asdict(Holder.me()), **fields}
    (run_dir / LOCAL_LOCK).write_text(json.dumps(holder))


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    run_dir = tmp_path / "run"
    _write_lock(run_dir, pid=_gone_pid(), token="dead")
    with hold_run_dir(run_dir) as me:
        assert json.loads((run_dir / LOCAL_LOCK).read_text())["token"] == me.token
    assert "taking over the lock of a run that is gone" in caplog.text


def test_a_holder_elsewhere_blocks_until_its_heartbeat_is_stale(tmp_path):
    run_dir = tmp_path / "run"
    _write_lock(run_dir, host="other-node", pid=1, heartbeat_at=time.time() - 30, token="remote")
    with pytest.raises(RunDirBusy, match="host other-node, pid 1"):
        with hold_run_dir(run_dir, stale_after_s=120):
            pass
    assert json.loads((run_dir / LOCAL_LOCK).read_text())["token"] == "remote"  # the refusal wrote nothing
    with hold_run_dir(run_dir, stale_after_s=20) as me:  # 30 s without a heartbeat: gone
        assert json.loads((run_dir / LOCAL_LOCK).read_text())["token"] == me.token


def test_the_heartbeat_keeps_a_long_run_fresh(tmp_path):
    run_dir = tmp_path / "run"
    with hold_run_dir(run_dir, stale_after_s=1.0, heartbeat_s=0.1) as me:
        time.sleep(1.5)  # longer than stale_after_s: only the heartbeat keeps the lock alive
        held = Holder(**json.loads((run_dir / LOCAL_LOCK).read_text()))
        assert held.token == me.token and time.time() - held.heartbeat_at < 0.5
        assert not held.dead(1.0)


HOLD = """
import sys, time
from forgetting_ray.run_lock import RunDirBusy, hold_run_dir
try:
    with hold_run_dir(sys.argv[1], settle_s=1.0):
        print("held", flush=True)
        time.sleep(4)
except RunDirBusy as e:
    print("busy:", e, flush=True)
"""


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_two_runs_started_at_once_one_proceeds(where, tmp_path, request):
    if where == "bucket":
        name, _ = request.getfixturevalue("bucket")
        run_dir = f"s3://{name}/runs/shared"
    else:
        run_dir = str(tmp_path / "run")
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, run_dir], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs[0].startswith("busy:") and outs[1] == "held", outs
    assert f"run_dir {run_dir} is in use by another run" in outs[0] and "pid" in outs[0]


def test_a_bucket_lock_is_kept_in_the_bucket_and_released(bucket):
    name, s3 = bucket
    run_dir = f"s3://{name}/runs/a"
    with hold_run_dir(run_dir, settle_s=0.1) as me:
        body = json.loads(s3.get_object(Bucket=name, Key="runs/a/run.lock.json")["Body"].read())
        assert body["token"] == me.token and body["host"] == socket.gethostname()
        with pytest.raises(RunDirBusy, match=f"pid {me.pid}"):
            with hold_run_dir(run_dir, settle_s=0.1):
                pass
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=name, Prefix="runs/a/").get("Contents", [])]
    assert "runs/a/run.lock.json" not in keys  # (pyarrow leaves a folder marker, runs/a/)


def test_the_cli_refuses_a_held_run_dir_with_one_line_and_writes_nothing(tmp_path, capsys):
    from forgetting_ray.cli import main

    run_dir = tmp_path / "run"
    with hold_run_dir(run_dir) as me:
        rc = main(["prepare", "examples/demo.yaml", f"run_dir={run_dir}", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: run_dir ") and f"pid {me.pid}" in err and "Traceback" not in err
    assert sorted(p.name for p in run_dir.iterdir()) in ([], ["logs"])  # no stage began
