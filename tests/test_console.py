"""The relayed console: Ray's known false alarm on the native stderr is dropped, every other native line and all
of Python's output reach the terminal, the child's exit status is the command's, and what a child killed
mid-run wrote still arrives."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

from forgetting_ray.cli import _starts_ray

FALSE_ALARM = ("[2026-12-06 10:00:00,000 E 4242 4242] core_worker.cc:2170: Actor with class name: "
               "'MapWorker(MapBatches(ScoreActor))' and ID: 'ab12' has constructor arguments in the object store "
               "and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
               "restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")


def _relayed(child_body: str) -> subprocess.CompletedProcess:
    child = "import os, sys\nfrom forgetting_ray.console import adopt_console\nassert adopt_console()\n" + \
        textwrap.dedent(child_body)
    parent = f"import sys\nfrom forgetting_ray.console import run_relayed\n" \
             f"sys.exit(run_relayed([sys.executable, '-c', {child!r}]))"
    proc = subprocess.run([sys.executable, "-c", parent], capture_output=True, timeout=60)  # bytes: \r kept
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def test_the_false_alarm_alone_is_dropped_and_the_status_passes_through():
    alarm = FALSE_ALARM.encode() + b"\n"
    proc = _relayed(f"""
        os.write(2, b"[2026-12-06 10:00:00,000 E 4242 4242] raylet_client.cc:10: a real native error\\n")
        os.write(2, {alarm!r})
        print("== score", file=sys.stderr)
        sys.stderr.write("\\rscore: 50%\\rscore: 100%\\n")
        print("| model | mean |")
        os.write(2, b"a native line without its newline")
        sys.exit(3)
    """)
    assert proc.returncode == 3, proc.stderr
    assert "has constructor arguments" not in proc.stderr and "core_worker" not in proc.stderr
    assert "a real native error\n" in proc.stderr and "== score\n" in proc.stderr
    assert "\rscore: 50%\rscore: 100%\n" in proc.stderr  # Python's stderr goes straight through, bars included
    assert proc.stderr.endswith("a native line without its newline")
    assert proc.stdout == "| model | mean |\n"


def test_a_child_killed_mid_run_still_has_its_last_words_shown():
    proc = _relayed("""
        import signal
        os.write(2, b"[2026-12-06 10:00:00,000 C 4242 4242] core_worker.cc:99: Check failed: fatal\\n")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert proc.returncode == 128 + 9
    assert "Check failed: fatal" in proc.stderr  # a core_worker line that is not the false alarm passes


def test_killing_the_relay_ends_the_run():
    parent = ("import sys\nfrom forgetting_ray.console import run_relayed\n"
              "sys.exit(run_relayed([sys.executable, '-c', 'import time; print(flush=True); time.sleep(60)']))")
    relay = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE)
    relay.stdout.readline()  # the child is up
    child = [int(p) for p in open(f"/proc/{relay.pid}/task/{relay.pid}/children").read().split()]
    relay.kill()
    relay.wait()
    deadline = time.monotonic() + 10
    while child and _alive(child[0]):
        assert time.monotonic() < deadline, "the child outlived its relay"
        time.sleep(0.1)
    assert child


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")


def test_which_command_lines_are_relayed():
    assert _starts_ray(["run", "examples/demo.yaml", "--tiny"])
    assert _starts_ray(["eval", "--model", "m"])
    assert not _starts_ray(["run", "examples/demo.yaml", "--verbose"])  # verbose shows everything
    assert not _starts_ray(["plan", "llama-3.2-1b"]) and not _starts_ray(["config"]) and not _starts_ray([])
    assert not _starts_ray(["-h"]) and not _starts_ray(["run", "--help"])
