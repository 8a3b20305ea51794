"""What a user sees on the console, and where the rest goes.

Without ``--verbose`` the console shows this package's own lines (a line per stage start and end, progress
bars, the final table) and errors; Ray's, Ray Data's, the libraries' logs and Python warnings go to
``<run_dir>/logs/driver.log``, and Ray workers' output stays in Ray's session logs instead of being copied to
the driver.  ``--verbose`` shows everything live, as before.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

QUIET_ENV = "FORGETTING_RAY_QUIET"  # "1": workers' output is not streamed to the driver (init_ray reads it)
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
