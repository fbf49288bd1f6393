"""One run at a time in a workdir: two runs writing the same checkpoints and metrics would
corrupt each other's, so a run (its lead process) and the recipe hold an exclusive lock
on WORKDIR/.lock while they work. The kernel drops it when the process ends, however it
ends, so a killed run never leaves a stale lock. On a filesystem without locks (some
network mounts) the run goes on unlocked."""

from __future__ import annotations

import fcntl
import os
from typing import IO

_HELD: dict[str, IO] = {}


class WorkdirBusy(RuntimeError):
    pass


def lock(workdir: str) -> None:
    """Takes WORKDIR/.lock, or raises WorkdirBusy when another process holds it. A lock
    this process still holds from an earlier run in it (one that raised) is retaken."""
    path = os.path.abspath(os.path.join(workdir, ".lock"))
    release(workdir)
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise WorkdirBusy(f"{workdir}: another run is using this workdir (it holds {path}); wait for it to end or "
                          "use another --workdir") from None
    except OSError:  # no locks on this filesystem
        f.close()
        return
    _HELD[path] = f


def release(workdir: str) -> None:
    f = _HELD.pop(os.path.abspath(os.path.join(workdir, ".lock")), None)
    if f is not None:
        f.close()
