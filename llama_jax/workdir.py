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
import socket
import sys
import tempfile
from typing import IO, Iterator

_HELD: dict[str, IO] = {}


def recorded_config(path: str) -> dict:
    """The settings a run recorded in WORKDIR/config.json (its latest start's); {} for an
    export, an import or a file that cannot be read: they record none."""
    import json

    try:
        with open(os.path.join(path, "config.json")) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def run_id(path: str) -> str:
    """WORKDIR/run_id: a random id made at a run's first start and kept by its resumes. It
    is in every checkpoint's metadata, so that a run started from this one tells a
    checkpoint of another run at the same path and step (retrained there, or copied over)
    from the one it began with."""
    import uuid

    file = os.path.join(path, "run_id")
    try:
        with open(file) as f:
            found = f.read().strip()
        if found:
            return found
    except OSError:
        pass
    made = uuid.uuid4().hex
    with open(file + ".tmp", "w") as f:
        f.write(made + "\n")
    os.replace(file + ".tmp", file)
    return made


def made_data(data_dir: str) -> list[str]:
    """The files a stage made in WORKDIR/data (`data_dir`): not its settings record, nor
    a file still being written (.tmp)."""
    if not os.path.isdir(data_dir):
        return []
    return [f for f in os.listdir(data_dir) if f != "settings.json" and not f.endswith(".tmp")]


def saved_steps(path: str) -> list[int]:
    """The steps WORKDIR `path` holds checkpoint directories of (complete or not), unread."""
    ckpts = os.path.join(path, "checkpoints")
    return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if os.path.isdir(ckpts) else []


def ran_past(path: str, total_steps: int, who: str) -> str:
    """Why an unfinished run in WORKDIR `path` cannot go on to `total_steps`, the count
    `who` (the recipe, a sweep) runs it for: its checkpoints are past it (it was run further
    with its own command and stopped); "" if it can."""
    steps = saved_steps(path)
    if not steps or steps[-1] <= total_steps or os.path.exists(os.path.join(path, "final_metrics.json")):
        return ""
    return (f"{path}: its latest checkpoint is step {steps[-1]}, past the {total_steps} steps {who} runs it for (it "
            "was run further with its own command): finish it with that command, or remove its directory to rerun it "
            "here")


def began(path: str) -> bool:
    """Whether a run in WORKDIR `path` did work a rerun goes on from: finished, logged a
    row, saved a checkpoint, or made data (a stage's samples). One refused at its start
    did not."""
    metrics, data = (os.path.join(path, n) for n in ("metrics.jsonl", "data"))
    return os.path.exists(os.path.join(path, "final_metrics.json")) or bool(saved_steps(path)) or \
        (os.path.exists(metrics) and os.path.getsize(metrics) > 0) or \
        bool(made_data(data))


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


PARTIAL = ".llama_jax-partial-"  # the staging directory of a write into a directory (see staged_directory)


def require_empty(dst: str, error: type[Exception]) -> None:
    """`dst` must be a new or empty directory: files left from another export (a
    consolidated.01.pth of a 2-shard one, a stale tokenizer.model) would be read as part of
    this one. What an interrupted write left (its staging directory) is removed."""
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise error(f"{dst}: exists and is not a directory")
    if not os.path.isdir(dst):
        return
    for name in os.listdir(dst):
        if name.startswith(PARTIAL):
            path = os.path.join(dst, name)
            owner = _staging_owner(name)
            if owner is not None:  # a write into dst that is still running: not ours to remove
                raise error(f"{dst}: another write into it is in progress ({path}, process {owner}); wait for it to "
                            "end, or remove that directory if no write is running")
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path}, left by a write that did not finish", file=sys.stderr)
    if os.listdir(dst):
        raise error(f"{dst}: not empty; choose a new or empty destination")


def _staging_name() -> str:
    return f"{PARTIAL}{os.getpid()}@{socket.gethostname()}-"


def _staging_owner(name: str) -> str | None:
    """'PID@HOST' of the process writing the staging directory `name` while it is alive (or
    on another host, where it cannot be told), else None: its write ended without finishing."""
    pid, _, rest = name[len(PARTIAL):].partition("@")
    host = rest.rsplit("-", 1)[0]
    if not pid.isdigit() or not rest:
        return None
    if host != socket.gethostname():
        return f"{pid}@{host}"
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return f"{pid}@{host}"


def _default_modes(root: str) -> None:
    """Files and directories under `root` get the modes the umask gives new ones: some
    writers make theirs private (safetensors' 0600 weights), which a shared export would
    keep from the other users its directory lets in."""
    mask = os.umask(0)
    os.umask(mask)
    for where, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(where, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(where, f), 0o666 & ~mask)


@contextlib.contextmanager
def staged_directory(dst: str, error: type[Exception]) -> Iterator[str]:
    """Yields a staging directory inside `dst` (a new or empty directory: a symlink or a
    mount point too) to write an export or import into; its files move up into `dst` only
    when the block finishes, so a write that fails (a full disk, a bad tensor) leaves
    nothing to clean up before the rerun, and one that is killed leaves only the staging
    directory, which the rerun removes. Failures are raised as one `error` naming `dst`."""
    require_empty(dst, error)
    made = not os.path.isdir(dst)
    try:
        os.makedirs(dst, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=_staging_name(), dir=dst)
    except OSError as e:
        raise error(f"{dst}: cannot create ({e})") from None
    try:
        yield tmp
        _default_modes(tmp)
        for name in os.listdir(tmp):
            os.rename(os.path.join(tmp, name), os.path.join(dst, name))
        os.rmdir(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if made:
            shutil.rmtree(dst, ignore_errors=True)
        if isinstance(e, error) or not isinstance(e, Exception):
            raise
        raise error(f"{dst}: writing failed, nothing was written ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'})") from e
