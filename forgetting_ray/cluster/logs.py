"""The workers' logs, into the run folder: every node's, through Ray's state API (no shared disk)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..store import atomic_write_text


def own_job_lines(text: str, job_id: str) -> tuple[str | None, str]:
    """The lines a Ray worker's log holds for ``job_id``, and the first actor or task name among them.

    A worker serves several jobs over its life; Ray marks each switch with ``:job_id:<hex>`` and
    ``:actor_name:``/``:task_name:`` lines (its own log streaming reads them too)."""
    name, current, kept = None, None, []
    for line in text.splitlines(keepends=True):
        if line.startswith(":job_id:"):
            current = line[len(":job_id:"):].strip()
        elif line.startswith((":actor_name:", ":task_name:")):
            if current == job_id and name is None:
                name = line.split(":", 2)[2].strip() or None
        elif current == job_id:
            kept.append(line)
    return name, "".join(kept)


def _local_logs_dir(ray) -> Path | None:
    try:
        return Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    except Exception:  # noqa: BLE001 - a Ray without this private path: the state API alone
        return None


def _read_local_worker_log(logs_dir: Path | None, pid: int, suffix: str) -> str | None:
    """The text of worker ``pid``'s log in this node's session (Ray names it ``worker-<id>-<job>-<pid>.<suffix>``)."""
    files = sorted(logs_dir.glob(f"worker-*-{pid}.{suffix}")) if logs_dir else []
    return "".join(f.read_text(errors="replace") for f in files) if files else None


def collect_worker_logs(folder: str | Path, since: float = 0.0, settle_s: float = 10.0) -> list[Path]:
    """Copy the stdout and stderr of every Ray worker that ran a task or actor of this driver's job (ended
    after ``since``, epoch seconds), on every node (through Ray's state API: no shared disk), to
    ``folder/<actor or task>-<node ip>-<pid>.{out,err}``.

    Returns the files written; a node that is gone (or a log Ray no longer has) is skipped with a debug line.
    ``settle_s``: task events reach the state API a second or more late (on a busy machine): the task list is
    read until two reads a second apart agree, for at most this long."""
    import time

    import ray

    if not ray.is_initialized():
        return []
    from ray.util.state import get_log, list_nodes, list_tasks

    log = logging.getLogger(__name__)
    context = ray.get_runtime_context()
    job, address = context.get_job_id(), context.gcs_address  # this cluster's, even with others on the machine
    deadline, seen = time.monotonic() + settle_s, -1
    try:
        while True:
            tasks = list_tasks(address=address, filters=[("job_id", "=", job)], detail=True, limit=10_000,
                               raise_on_missing_output=False)
            if (tasks and len(tasks) == seen) or time.monotonic() > deadline:
                break
            seen = len(tasks)
            time.sleep(1.0)
        ips = {n.node_id: n.node_ip for n in list_nodes(address=address, raise_on_missing_output=False)}
    except Exception as e:  # noqa: BLE001 - no dashboard (a cluster started without one): nothing to copy
        log.warning("worker logs not copied: Ray's state API did not answer (%s)", e)
        return []
    written = []
    here, local_logs = context.get_node_id(), _local_logs_dir(ray)
    recent = [t for t in tasks if t.node_id and t.worker_pid and (t.end_time_ms or 1e18) >= since * 1000]
    for node, pid in sorted({(t.node_id, t.worker_pid) for t in recent}):
        for suffix in ("out", "err"):
            try:
                text = "".join(get_log(address=address, node_id=node, pid=pid, suffix=suffix, timeout=30))
            except Exception as e:  # noqa: BLE001 - a node lost mid-run keeps its logs
                # this node's log agent may be missing (a second local cluster on one machine finds the agent's
                # fixed port taken): the driver's own node has the files on its disk
                text = _read_local_worker_log(local_logs, pid, suffix) if node == here else None
                if text is None:
                    log.debug("no %s log of worker %s on node %s: %s", suffix, pid, node, e)
                    continue
            name, own = own_job_lines(text, job)
            if own.strip():
                stem = re.sub(r"[^\w.()-]+", "_", f"{name or 'worker'}-{ips.get(node, node[:8])}-{pid}")
                written.append(atomic_write_text(Path(folder) / f"{stem}.{suffix}", own))
    return written
