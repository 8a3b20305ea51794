"""The workers' own output reaches the run folder: through Ray's state API, and from the driver node's disk
when that node's log agent is missing (a second local cluster on one machine: the agent's fixed port is
taken by the first one's, as in this test session and on a user's laptop with two runs)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

from .conftest import REPO

SECOND_CLUSTER = textwrap.dedent("""
    import sys, time
    from forgetting_ray.cluster.logs import collect_worker_logs
    from forgetting_ray.cluster.session import init_ray
    started = time.time()
    ray = init_ray(num_cpus=1)

    @ray.remote(num_cpus=0)
    class Talker:
        def say(self, text):
            print(text, flush=True)
            return text

    ray.get(Talker.remote().say.remote("second cluster's actor speaking"))
    for path in collect_worker_logs(sys.argv[1], started):
        print("WROTE", path)
""")


def test_an_actors_output_is_copied_through_the_state_api(ray_cluster, tmp_path):
    started = time.time()

    @ray_cluster.remote(num_cpus=0)
    class Talker:
        def say(self, text):
            print(text, flush=True)
            return text

    ray_cluster.get(Talker.remote().say.remote("first cluster's actor speaking"))
    from forgetting_ray.cluster.logs import collect_worker_logs

    files = collect_worker_logs(tmp_path / "first", started)
    assert any(f.name.startswith("Talker-") and "first cluster's actor speaking" in f.read_text() for f in files), files


def test_a_second_local_cluster_without_a_log_agent_still_keeps_its_workers_output(ray_cluster, tmp_path):
    assert ray_cluster.is_initialized()  # the session's cluster holds the log agent's port
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=REPO, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-c", SECOND_CLUSTER, str(tmp_path / "second")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("WROTE ")]
    texts = {os.path.basename(p): open(p).read() for p in written}
    assert any(n.startswith("Talker-") and "second cluster's actor speaking" in t for n, t in texts.items()), proc.stdout
    assert not any("first cluster" in t for t in texts.values())  # only its own job's workers
