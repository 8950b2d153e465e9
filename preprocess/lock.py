"""One sharding run per OUT (and per array-job part): a lock file in OUT holding the holder's host and pid.

* A whole run (no --num-jobs, or --merge) holds ``OUT/.preprocess.lock``; array job i of J holds
  ``OUT/.preprocess.job-<i>-of-<J>.lock``, so the J parts run side by side, but the same part twice does not.
  A whole run refuses while any part runs, and a part refuses while a whole run holds OUT: each takes its own
  lock first and then looks at the others, so of two that start together at least one sees the other.
* The file is created with O_EXCL (atomic on local disks and NFS v3+) and holds JSON: host, pid, the process's
  start time (so a reused pid is not taken for the holder), the command, when it started.
* A lock whose holder is gone (same host, and that pid is not running or is another process) is stale: it is
  taken over with a note. A holder on another host cannot be checked from here: the message names it and says
  to delete the file once that run is known to be gone.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

MAIN = ".preprocess.lock"
EMPTY_STALE_S = 10.0   # a lock file still empty (or torn) this long after it was made: its writer died writing it


class LockedError(RuntimeError):
    """Another run holds the lock: the message names it (host, pid, command, since when) and what to do."""


def job_lock_name(job_index: int, num_jobs: int) -> str:
    return f".preprocess.job-{job_index}-of-{num_jobs}.lock"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[19]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> dict | None:
    """The holder recorded in a lock file; {} when it is unreadable (being written, or torn); None when absent."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def holder_alive(holder: dict) -> bool | None:
    """True / False for a holder on this host; None when it cannot be told (another host, or no record)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    pid = holder["pid"]
    if not pid_alive(pid):
        return False
    started = holder.get("start")
    return started is None or _start_time(pid) in (None, started)   # a reused pid is another process


def describe(holder: dict, path: Path) -> str:
    if not holder:
        return f"{path} (its content cannot be read yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {since}: "
            f"{holder.get('command', '?')})")


class Lock:
    """``with Lock(out, name): ...`` holds ``out/name`` for the block. Raises LockedError naming the holder."""

    def __init__(self, folder: Path, name: str = MAIN):
        self.path = Path(folder) / name
        self.taken_over: dict | None = None      # the stale holder this lock replaced, if any
        self._mine: str | None = None

    def acquire(self) -> "Lock":
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
              "since": round(time.time(), 3), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]}
        text = json.dumps(me, sort_keys=True) + "\n"
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None:
                    continue                      # released meanwhile: try again
                if not holder:                    # being written this instant by the holder: look again
                    time.sleep(0.05)
                    holder = _read(self.path)
                    if holder is None:
                        continue
                alive = holder_alive(holder) if holder else None
                if not holder and _age(self.path) > EMPTY_STALE_S:
                    alive = False                 # created and never written: its writer died in between
                if alive is False:
                    self._take_over(holder)
                    continue
                hint = ("wait for it to finish, or stop it" if alive else
                        "if that run is gone (it ran on another machine, or was killed there), delete the lock file")
                raise LockedError(f"{self.path.parent} is being written by another `python -m preprocess` run: "
                                  f"{describe(holder, self.path)}. Two runs on one output folder would remove each "
                                  f"other's files; {hint} ({self.path}) and run again (it resumes).")
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            self._mine = text
            return self
        raise LockedError(f"{self.path}: could not take the lock (it changed hands 20 times in a row)")

    def _take_over(self, stale: dict) -> None:
        """Remove a dead holder's lock, without ever removing a live one that replaced it meanwhile: move the
        file aside under a name of our own (atomic), check it is still the stale one, and put it back if not."""
        aside = self.path.with_name(f"{self.path.name}.{os.getpid()}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _read(aside) == stale:
            aside.unlink(missing_ok=True)
            self.taken_over = stale
            print(f"note: took over the lock {self.path} of a run that is gone ({describe(stale, self.path)})",
                  file=sys.stderr)
            return
        try:                                      # another run's fresh lock: give it back (unless a third took it)
            os.link(aside, self.path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)

    def holder(self) -> dict | None:
        return _read(self.path)

    def release(self) -> None:
        if self._mine is not None:
            try:
                if self.path.read_text() == self._mine:
                    self.path.unlink()
            except FileNotFoundError:
                pass
            self._mine = None

    def __enter__(self) -> "Lock":
        return self if self._mine is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def live_holders(folder: Path, pattern: str) -> list[tuple[Path, dict]]:
    """Locks in ``folder`` matching ``pattern`` whose holder is alive or cannot be checked (another host)."""
    out = []
    for p in sorted(Path(folder).glob(pattern)):
        holder = _read(p)
        if holder is not None and holder_alive(holder) is not False:
            out.append((p, holder))
    return out
