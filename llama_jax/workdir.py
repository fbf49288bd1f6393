"""One run at a time in a workdir: two runs writing the same checkpoints and metrics would
corrupt each other's, so a run (its lead process) and the recipe hold an exclusive lock
on WORKDIR/.lock while they work. The kernel drops it when the process ends, however it
ends, so a killed run never leaves a stale lock. On a filesystem without locks (some
network mounts) the run goes on unlocked."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from typing import IO, Iterator

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


@contextlib.contextmanager
def staged_directory(dst: str, error: type[Exception]) -> Iterator[str]:
    """Yields a new directory beside `dst` to write an export or import into; it becomes
    `dst` (which must be new or empty) only when the block finishes, so a write that fails
    (a full disk, a bad tensor) leaves nothing behind to block the rerun. Failures are
    raised as one `error` naming `dst`."""
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise error(f"{dst}: exists and is not a directory")
    if os.path.isdir(dst) and os.listdir(dst):  # files left from another export (a consolidated.01.pth of a 2-shard
        # one, a stale tokenizer.model) would be read as part of this one
        raise error(f"{dst}: not empty; choose a new or empty destination")
    parent = os.path.dirname(os.path.abspath(dst))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(dst))}.partial-", dir=parent)
    except OSError as e:
        raise error(f"{dst}: cannot create ({e})") from None
    try:
        yield tmp
        if os.path.isdir(dst):
            os.rmdir(dst)
        os.rename(tmp, dst)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, error) or not isinstance(e, Exception):
            raise
        raise error(f"{dst}: writing failed, nothing was written ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'})") from e
