"""Runs one job as N processes on this machine, with JAX's multi-controller runtime: the
same code path as a TPU pod slice or a multi-node GPU cluster, on a laptop's CPU.

    python launch/local.py --num_processes=2 --devices_per_process=4 -- \\
        python -m llama_jax.main --config=experiments/pretrain.py:tiny --workdir=runs/tiny_mh

(`--` may be followed by `-m llama_jax.main ...`, or just the main's flags: a command that
does not start with `python`/`-m` runs `python -m llama_jax.main` with those flags.)

Each process gets JAX_COORDINATOR_ADDRESS (a free localhost port), JAX_NUM_PROCESSES,
JAX_PROCESS_ID, JAX_PLATFORMS=cpu and M fake CPU devices; `llama_jax.main` joins the job
from those (`llama_jax.distributed`), with gloo for CPU collectives. Process 0's output
is shown as is, the others' prefixed with `[pN]` (gloo's connection lines are left out).
SIGTERM and SIGHUP (a closed terminal; sent on as SIGTERM) make every process save the
step they agree on; SIGINT is passed on and stops them at once. If this launcher is
killed outright (SIGKILL), the processes are killed with it (Linux), never left waiting
for each other. If any process exits non-zero the others are stopped and this launcher
exits with the code of the first to fail (128 + N for one killed by signal N), naming it
when the others were still running or it was killed. Only
`llama_jax.main` joins such a job; the one-process commands (generate, chat, evaluate,
convert, checkpoint, data.prepare, tokenizer) and the recipe (which starts its own
one-process stages) refuse to run under it.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_command(args: list[str]) -> list[str]:
    if not args:
        raise SystemExit("error: give the command after --, e.g. -- -m llama_jax.main --config=... --workdir=...")
    if os.path.basename(args[0]).startswith("python"):
        return [sys.executable, *args[1:]]
    if args[0] == "-m":
        return [sys.executable, *args]
    return [sys.executable, "-m", "llama_jax.main", *args]


def child_env(process_id: int, num_processes: int, devices: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f)
    env.update({
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(num_processes),
        "JAX_PROCESS_ID": str(process_id),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
        "PYTHONUNBUFFERED": "1",
    })
    return env


# gloo's own connection lines: on stdout as whole lines (this JAX), on stderr sometimes split
# by interleaving, so there any of their parts; a program's own lines are never matched
GLOO_CHATTER = {"stdout": re.compile(r"^\[Gloo\] Rank \d+ is connected to \d+ peer ranks\."),
                "stderr": re.compile(r"\[Gloo\]|Rank \d+ is connected to \d+ peer ranks|Expected number of "
                                     r"connected peer ranks")}


def _pump(stream, prefix: str, out, chatter: re.Pattern) -> None:
    """Copies a child's output with `prefix` on each line; a progress line redrawn with
    carriage returns stays one line (each part up to a \r is prefixed and ends with it)."""
    shown = True
    stream = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")  # \r kept as written
    for line in iter(stream.readline, ""):
        if not shown or chatter.search(line):
            continue  # read on regardless: a process whose output pipe fills up would stop
        try:
            out.write(prefix + line)
            out.flush()
        except (OSError, ValueError):  # the terminal went away (SIGHUP): the rest is dropped
            shown = False


def _prctl():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _prctl()  # looked up here, once: a child between fork and exec should only call it


def _die_with_launcher() -> None:
    """In each child before it starts: SIGKILL when this launcher dies, whatever kills it
    (PR_SET_PDEATHSIG, Linux); a process whose peers are gone would wait for them. SIGINT
    back to its default: a shell starts a background job with SIGINT ignored, which the
    children would inherit, and the SIGINT this launcher sends on would do nothing."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


FAILURE_GRACE_S = 6.0  # llama_jax.main's lead process waits 3 s before it exits (main.LEAD_EXIT_DELAY_S)


def launch(command: list[str], num_processes: int, devices_per_process: int, timeout: float | None = None) -> int:
    port = free_port()
    procs, pumps = [], []
    for i in range(num_processes):
        p = subprocess.Popen(command, env=child_env(i, num_processes, devices_per_process, port),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True, preexec_fn=_die_with_launcher)
        procs.append(p)
        prefix = "" if i == 0 else f"[p{i}] "
        for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            chatter = GLOO_CHATTER["stderr" if out is sys.stderr else "stdout"]
            t = threading.Thread(target=_pump, args=(stream, prefix, out, chatter), daemon=True)
            t.start()
            pumps.append(t)

    def stop(sig=signal.SIGTERM) -> None:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    def forward(signum, _frame) -> None:
        stop(signal.SIGTERM if signum == signal.SIGHUP else signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    deadline = None if timeout is None else time.monotonic() + timeout
    code, failed_at, first = 0, None, None
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                first = first or failed[0]  # the first seen to fail: the others' failures may follow from it
                i, code = first
                failed_at = failed_at or time.monotonic()
                if any(c is None for c in codes) and time.monotonic() - failed_at < FAILURE_GRACE_S:
                    time.sleep(0.1)  # processes that fail alike (a refused setting) exit on their own
                    continue
                killed = code < 0
                code = 128 - code if killed else code  # killed by signal N: 128 + N, as a shell says it
                running = any(c is None for c in codes)
                if running or killed:  # (processes that fail alike have each said why; one killed has not)
                    print(f"launch/local.py: process {i} exited with code {code}"
                          + (f" (killed by signal {code - 128})" if killed else "")
                          + ("; stopping the others" if running else ""), file=sys.stderr, flush=True)
                if running:
                    stop()
                    time.sleep(5)
                    stop(signal.SIGKILL)
                break
            if all(c == 0 for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"launch/local.py: timed out after {timeout} s; stopping every process", file=sys.stderr)
                stop(signal.SIGKILL)
                code = 124
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            p.wait()
        for t in pumps:
            t.join(timeout=5)
        for s, h in old.items():
            signal.signal(s, h)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        i = argv.index("--")
        ours, command = argv[:i], argv[i + 1:]
    else:
        ours, command = argv, []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2, help="processes of the job (default: 2)")
    parser.add_argument("--devices_per_process", type=int, default=1,
                        help="fake CPU devices of each process (default: 1)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds; kill the job after it")
    args = parser.parse_args(ours)
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be >= 1")
    return launch(child_command(command), args.num_processes, args.devices_per_process, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
