"""One pipeline at a time per ``run_dir``: a lock naming its holder, kept alive by a heartbeat.

Two runs started on one run folder would write the same stage folders (the same keys, the same files) and the
same run card. The first takes the lock; the second stops at once with an error naming the holder (host, pid,
start time, last heartbeat). A holder that died does not block: on its own host a dead pid frees the lock at
once; elsewhere the lock is taken over once its heartbeat is ``stale_after_s`` old.

Where the lock lives: ``<run_dir>/.run.lock`` for a local folder, created with ``O_EXCL`` (atomic on local
disks and NFSv3+). In a bucket, ``<run_dir>/run.lock.json``: object stores reached through ``pyarrow.fs`` have
no create-if-absent, so a taker reads, writes its own token, waits ``settle_s`` and reads back; two takers that
both saw no lock both write, and only the one whose token is there after the wait proceeds. Two drivers would
both proceed only if one's write landed later than the other's read-back, ``settle_s`` (2 s) after it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from .errors import UserError
from .store import _filesystem, _read_remote, is_uri, run_root

log = logging.getLogger(__name__)

LOCAL_LOCK = ".run.lock"
BUCKET_LOCK = "run.lock.json"


class RunDirBusy(UserError, RuntimeError):
    """Another live run holds this ``run_dir``."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_started: str  # the process's start (from /proc): a pid the kernel reused is not the holder
    started_at: str  # ISO time the run took the lock
    heartbeat_at: float  # epoch seconds of the last heartbeat
    token: str

    @classmethod
    def me(cls) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()),
                   datetime.now(timezone.utc).isoformat(timespec="seconds"), time.time(), uuid.uuid4().hex)

    def beat(self) -> "Holder":
        return Holder(**{**asdict(self), "heartbeat_at": time.time()})

    def describe(self) -> str:
        age = time.time() - self.heartbeat_at
        return f"host {self.host}, pid {self.pid}, since {self.started_at} (last heartbeat {age:.0f} s ago)"

    def dead(self, stale_after_s: float) -> bool:
        """Surely gone: its process is not running on this host, or its heartbeat stopped long enough ago."""
        if self.host == socket.gethostname() and _process_start(self.pid) != self.pid_started:
            return True
        return time.time() - self.heartbeat_at > stale_after_s


def _process_start(pid: int) -> str:
    """A process's start time in clock ticks since boot ('' when it is not running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


class _LocalLock:
    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCAL_LOCK
        self.where = str(self.path)
        self.made_folder = not folder.exists()  # a run that fails early leaves no empty run_dir behind

    def create(self, holder: Holder) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(holder)))
        return True

    def read(self) -> Holder | None:
        try:
            return Holder(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # being written (created, not yet filled) or foreign: judged by its age
            try:
                return Holder("?", 0, "", "?", self.path.stat().st_mtime, "")
            except FileNotFoundError:
                return None

    def write(self, holder: Holder) -> None:
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(asdict(holder)))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        if self.made_folder:
            with contextlib.suppress(OSError):  # not empty: the run wrote there
                self.path.parent.rmdir()

    def take_over(self, stale: Holder) -> None:
        """Move the dead holder's lock aside, unless another taker has replaced it with a live one meanwhile."""
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = Holder(**json.loads(aside.read_text()))
        except (ValueError, TypeError):
            moved = stale
        if moved.token != stale.token:  # a live taker's fresh lock: put it back (fails only if one exists)
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)


class _BucketLock:
    def __init__(self, uri: str, settle_s: float) -> None:
        self.where = f"{uri.rstrip('/')}/{BUCKET_LOCK}"
        self.fs, self.key = _filesystem(self.where)
        self.settle_s = settle_s

    def create(self, holder: Holder) -> bool:
        if self.read() is not None:
            return False
        self.write(holder)
        time.sleep(self.settle_s)  # another taker that also saw no lock has written by now
        now = self.read()
        return now is not None and now.token == holder.token

    def read(self) -> Holder | None:
        try:
            return Holder(**json.loads(_read_remote(self.fs, self.key)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # foreign content (one PUT writes ours whole): a lock nobody renews
            return Holder("?", 0, "", "?", 0.0, "")

    def write(self, holder: Holder) -> None:
        self.fs.write_bytes(self.key, json.dumps(asdict(holder)).encode())

    def remove(self) -> None:
        try:
            self.fs.delete(self.key)
        except FileNotFoundError:
            pass

    def take_over(self, stale: Holder) -> None:
        self.remove()  # two takers both write next; the read-back after settle_s picks one


@contextmanager
def hold_run_dir(run_dir: str | Path, *, stale_after_s: float = 120.0, heartbeat_s: float | None = None,
                 settle_s: float = 2.0) -> Iterator[Holder]:
    """Hold ``run_dir`` for the block, or raise :class:`RunDirBusy` naming the live holder.  A dead holder's
    lock (see :meth:`Holder.dead`) is taken over with a warning; the heartbeat refreshes the lock every
    ``heartbeat_s`` (default a quarter of ``stale_after_s``) while the block runs."""
    lock = _BucketLock(str(run_dir), settle_s) if is_uri(run_dir) else _LocalLock(run_root(run_dir))
    me = Holder.me()
    while not lock.create(me):
        other = lock.read()
        if other is None:
            continue  # released between our attempt and the read
        if other.token == me.token:
            break
        if not other.dead(stale_after_s):
            raise RunDirBusy(f"run_dir {run_dir} is in use by another run ({other.describe()}): wait for it, or "
                             f"use another run_dir. If that run is dead, its lock {lock.where} is taken over once "
                             f"its heartbeat is {stale_after_s:.0f} s old (run_dir_lock_stale_s).")
        log.warning("run_dir %s: taking over the lock of a run that is gone (%s)", run_dir, other.describe())
        lock.take_over(other)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, me, stop, heartbeat_s or stale_after_s / 4),
                            name="run-dir-lock", daemon=True)
    beat.start()
    try:
        yield me
    finally:
        stop.set()
        beat.join()
        if (lock.read() or me).token == me.token:
            lock.remove()


def _heartbeat(lock, me: Holder, stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            now = lock.read()
            if now is not None and now.token != me.token:
                log.error("run_dir lock %s was taken over by %s; this run no longer holds it", lock.where,
                          now.describe())
                return
            lock.write(me.beat())
        except OSError as e:  # a storage hiccup: the next beat tries again, well before the lock goes stale
            log.warning("run_dir lock %s: heartbeat failed (%s)", lock.where, e)
