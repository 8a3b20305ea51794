"""What a user sees on the console, and where the rest goes.

Without ``--verbose`` the console shows this package's own lines (a line per stage start and end, progress
bars, the final table) and errors; Ray's, Ray Data's, the libraries' logs and Python warnings go to
``<run_dir>/logs/driver.log``, and Ray workers' output stays in Ray's session logs instead of being copied to
the driver.  ``--verbose`` shows everything live, as before.

Ray's C++ core writes its error lines to the driver's native stderr, past Python's logging. One of them is a
false alarm on every Ray Data run (ray#57733: Ray Data hands each map actor its own context through the object
store, and the core warns about any restartable actor with such arguments), so a quiet CLI run is relayed
(:func:`run_relayed`): Python's own output goes straight to the terminal, the native stream through a filter
that drops that line alone. It stays in Ray's ``python-core-driver-*.log``.
"""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

QUIET_ENV = "FORGETTING_RAY_QUIET"  # "1": workers' output is not streamed to the driver (init_ray reads it)
CONSOLE_FD_ENV = "FORGETTING_RAY_CONSOLE_FD"  # in a relayed child: the terminal's stderr, for Python's output
KNOWN_FALSE_ALARMS = re.compile(
    rb"core_worker\.cc:\d+.*has constructor arguments in the object store and max_restarts > 0")
LOG_FILE = "driver.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _OwnLines(logging.Filter):
    """The console's filter: this package's records, and anyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("forgetting_ray") or record.levelno >= logging.ERROR


def setup_console(verbose: bool) -> None:
    """Console logging for a CLI run (before the config is read: no log file yet)."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    _drop_own_handlers(logging.StreamHandler)
    console = logging.StreamHandler(sys.stderr)
    console._forgetting_ray = True  # type: ignore[attr-defined]
    if verbose:
        console.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
    else:
        console.setFormatter(logging.Formatter("%(message)s"))
        console.addFilter(_OwnLines())
    root.addHandler(console)
    logging.captureWarnings(True)  # library warnings become log records: in the file, not on the console
    os.environ[QUIET_ENV] = "0" if verbose else "1"
    if not verbose:
        # the libraries' own bars and links (transformers' shard writer, MLflow's "View run" lines): the stage
        # lines, our bars and the printed MLflow link say it once
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # mlflow's records to the root: the file
        _propagate_only("mlflow")  # in case it was imported already


def log_to_file(folder: str | Path) -> Path:
    """Also write every record (all loggers, warnings included) to ``folder/driver.log``; returns its path."""
    path = (Path(folder) / LOG_FILE).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_own_handlers(logging.FileHandler)  # one run's log per process (a test session runs many)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler._forgetting_ray = True  # type: ignore[attr-defined]
    logging.getLogger().addHandler(handler)
    return path


def current_log_file() -> Path | None:
    """The file :func:`log_to_file` writes to in this process, if any."""
    for h in logging.getLogger().handlers:
        if getattr(h, "_forgetting_ray", False) and isinstance(h, logging.FileHandler):
            return Path(h.baseFilename)
    return None


def close_log_file() -> None:
    _drop_own_handlers(logging.FileHandler)


def _drop_own_handlers(kind: type[logging.Handler]) -> None:
    """Remove the root handlers of ``kind`` this module added (others, e.g. pytest's, stay)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_forgetting_ray", False) and type(h) is kind:
            root.removeHandler(h)
            h.close()


def quiet() -> bool:
    return os.environ.get(QUIET_ENV) == "1"


def route_ray_logs() -> None:
    """Ray and Ray Data attach console handlers of their own: in a quiet run their records go through the
    root logger instead (to the log file)."""
    if not quiet():
        return
    import ray.data  # noqa: F401 - configures its loggers on import; undone below

    _propagate_only("ray", "ray.data", "ray.train", "ray.tune")


def _propagate_only(*names: str) -> None:
    """Take the console handlers a library attached to its loggers off; their records go to the root's."""
    for name in names:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
        logger.propagate = True


def run_relayed(cmd: list[str]) -> int:
    """Run ``cmd`` (this CLI again) as a child whose native stderr passes through :data:`KNOWN_FALSE_ALARMS`;
    returns its exit status (128 + N for signal N). A separate process, so that what a crashing child wrote last
    (a fatal check of Ray's core, say) still reaches the terminal."""
    terminal = os.dup(2)
    child = subprocess.Popen(cmd, stderr=subprocess.PIPE, pass_fds=(terminal,),
                             env={**os.environ, CONSOLE_FD_ENV: str(terminal)},
                             preexec_fn=_end_with_parent if sys.platform == "linux" else None)
    os.close(terminal)
    # Ctrl-C reaches the child from the terminal itself; a SIGTERM sent to this process is passed on
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM,
                                                                          lambda *_: child.terminate())
    try:
        _relay(child.stderr.fileno(), child)
        status = child.wait()
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
        child.stderr.close()
    return 128 - status if status < 0 else status  # as a shell reports a signal


def _end_with_parent() -> None:
    """In the child before it starts: a SIGTERM when the relay dies, even by SIGKILL (a run nobody watches)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _relay(source: int, child: subprocess.Popen, linger_s: float = 2.0) -> None:
    """Copy whole lines from ``source`` to this process's stderr, except known false alarms, until it closes
    (or ``linger_s`` after the child ended: a process it started may still hold the pipe open)."""
    out, pending, ended = sys.stderr.buffer, b"", None
    while True:
        if select.select([source], [], [], 0.2)[0]:
            chunk = os.read(source, 1 << 16)
            if not chunk:
                break
            cut = (pending + chunk).rfind(b"\n") + 1
            lines, pending = (pending + chunk)[:cut], (pending + chunk)[cut:]
            out.write(b"".join(line for line in lines.splitlines(keepends=True)
                               if not KNOWN_FALSE_ALARMS.search(line)))
            out.flush()
        elif child.poll() is not None:
            ended = ended or time.monotonic()
            if time.monotonic() - ended > linger_s:
                break
    if pending and not KNOWN_FALSE_ALARMS.search(pending):
        out.write(pending)
        out.flush()


def adopt_console() -> bool:
    """In a relayed child: Python's stderr becomes the terminal's again (bars and lines keep their order with
    stdout and see a terminal when there is one); the native stderr stays the relay's. False elsewhere."""
    fd = os.environ.pop(CONSOLE_FD_ENV, None)  # popped: Ray's workers inherit the environment, not the fd
    if fd is None:
        return False
    sys.stderr = open(int(fd), "w", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    return True
