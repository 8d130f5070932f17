"""One run per workdir: WORKDIR/run.lock names the process that holds it (pid, host, start
time). A lock whose process is gone is taken over: on this host a dead pid, elsewhere (a shared
filesystem) a heartbeat, the file's mtime, older than STALE_S.
"""

import datetime
import json
import os
import socket
import threading

from absl import logging

NAME = "run.lock"
HEARTBEAT_S = 30  # a touch of the file's mtime, from a thread: steps and compiles may be long
STALE_S = 600

_held = None  # this process's lock, so every exit path (main, a signal) can release it


class WorkdirBusy(ValueError):
    """Another live run holds the workdir; the message names it."""


def acquire(workdir):
    """Takes WORKDIR/run.lock or raises WorkdirBusy; a stale lock is taken over with a warning."""
    global _held
    path = workdir / NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().isoformat(timespec="seconds")}
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder, why = _holder(path)
            if why is None:
                raise WorkdirBusy(
                    f"--workdir={workdir} is in use by process {holder.get('pid')} on "
                    f"{holder.get('host')} (started {holder.get('started')}): wait for it, stop "
                    f"it, or use another --workdir; if that run is gone, delete {path}") from None
            logging.warning("taking over %s from process %s on %s (started %s): %s", path,
                            holder.get("pid"), holder.get("host"), holder.get("started"), why)
            # a run that judged the same lock stale at the same instant finds ours at O_EXCL
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _held = _Heartbeat(path)
        return
    raise WorkdirBusy(f"--workdir={workdir}: another run took {path} while this one took it "
                      "over: use another --workdir")


def release():
    """Gives up this process's lock, if it holds one; safe to call on any exit path."""
    global _held
    held, _held = _held, None
    if held is not None:
        held.stop()


def _holder(path):
    """(the lock's contents, why it is stale or None while its run may be alive)."""
    try:
        age = datetime.datetime.now().timestamp() - path.stat().st_mtime
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, "released meanwhile"
    except (OSError, ValueError):  # a run killed between creating and writing it (or now in it)
        return {}, "the lock file is unreadable" if age > 10 else None
    if holder.get("host") == socket.gethostname():
        if holder.get("pid") == os.getpid():
            return holder, "left by an earlier run in this process"
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return holder, "that process is gone"
        except (PermissionError, KeyError, TypeError):
            pass  # alive under another user, or no pid: the heartbeat decides
    if age > STALE_S:
        return holder, f"no heartbeat for {age / 60:.0f} minutes"
    return holder, None


class _Heartbeat:
    """Touches the lock every HEARTBEAT_S, so a run on another host sees this one alive."""

    def __init__(self, path):
        self.path, self.stopped = path, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self):
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a missed beat is harmless; STALE_S is many beats

    def stop(self):
        self.stopped.set()
        try:
            if json.loads(self.path.read_text())["pid"] == os.getpid():  # not a successor's
                self.path.unlink()
        except (OSError, ValueError, KeyError):
            pass
