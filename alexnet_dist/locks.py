"""Exclusive locks on a folder that say who holds them: one run per run directory (training/
run_dir.py), one writer per data folder (alexnet-prepare).

The lock is the kernel's (flock on a file in the folder): it goes with the process that holds it,
however that ends (kill -9 included), so a stale lock file never blocks anything; the file's
text only names the holder (host, pid, command, since when) for the refusal line.
"""

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

# The lock file of a data folder, held by the alexnet-prepare writing there; a training about to
# read the folder looks at it too.
DATA_FOLDER = "prepare.lock"


def holder(file) -> dict:
    """What the holder of the open lock file `file` wrote about itself ({} if nothing readable)."""
    file.seek(0)
    try:
        found = json.loads(file.read() or "{}")
    except json.JSONDecodeError:
        return {}
    return found if isinstance(found, dict) else {}


def describe(who: dict) -> str:
    """A lock's holder in words: pid 12 on HOST (COMMAND), SLURM job 3, since 2026-12-07 18:20:00."""
    if not who:
        return "another process"
    command = f" ({who['command']})" if who.get("command") else ""
    job = f", SLURM job {who['slurm_job']}" if who.get("slurm_job") else ""
    return f"pid {who.get('pid')} on {who.get('host')}{command}{job}, since {who.get('since')}"


def take(path: Path, about: dict, unguarded: str, wait: Callable[[dict], bool] = lambda holder: False):
    """The open file `path`, locked exclusively (keep it open to hold the lock; close it to let
    go), with this process described in it (pid, host, since, and `about`); or, when another
    process holds it, that holder's description (a dict). `wait(holder)` says whether to try
    again in a moment rather than give up. On a file system without locks this warns once,
    naming `unguarded` (what then goes unchecked), and goes on with the file unlocked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file = open(path, "a+")  # noqa: SIM115 - held open as long as the lock is
    while True:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            found = holder(file)
            if wait(found):
                time.sleep(0.5)
                continue
            file.close()
            return found
        except OSError as exc:
            print(f"warning: {path}: cannot be locked ({exc.strerror}); {unguarded}", file=sys.stderr)
            break
    file.seek(0)
    file.truncate()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), **about, "since": since}))
    file.flush()
    return file


def held_by(path: Path) -> dict | None:
    """Who holds the lock on `path` right now (their description, {} if they wrote none), or None
    when nobody does (or it cannot be told: no such file, no locks there). Takes nothing."""
    try:
        file = open(path)  # noqa: SIM115 - closed below
    except OSError:
        return None
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return holder(file)
        except OSError:
            return None
        return None  # closing the file lets go of the shared lock at once
