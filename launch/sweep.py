"""Ablations from config overrides: every combination of the swept values, one workdir
each, named by its overrides.

    python launch/sweep.py --config=experiments/pretrain.py:tiny --workdir=runs/lr_sweep \\
        --sweep='optimizer.learning_rate=1e-3,3e-3' --sweep='model.n_layers=2,4' \\
        [--launcher=local|print|tpu_vm] [-- --config.total_steps=200 ...]
    python -m llama_jax.compare runs/lr_sweep/*

`--launcher=local` (default) runs the combinations one after another on this machine
(a combination whose workdir already has `final_metrics.json` is skipped, so a sweep that
was interrupted continues where it stopped; the interrupted run itself resumes from its
checkpoint). Before anything runs, every combination's command is parsed and
checked as its run would check it (a value of the wrong type, `total_steps=0`, a NaN
temperature: one error naming the combination; a run whose checkpoints are past its step
count, run further with its own command, is refused too). Each run's directory records its command
(`sweep_run.json`); a rerun whose command for that directory differs (other flags after
`--`, or another sweep whose names coincide) is refused, naming the differing flags, rather
than taking the finished run for the new one. SIGINT and SIGTERM reach the running
combination (it saves its step on SIGTERM), and the sweep stops. `print` prints each
`python -m llama_jax.main` command; `tpu_vm` prints one
`launch/tpu_vm.sh run` command per combination for the TPU VM named by `--tpu`: `run`
starts its run in the background and returns, and a slice runs one run at a time (its
log is `logs/run.log`), so start each when the one before has finished, or give each
its own slice (edit the printed names). Flags after `--` are passed to every run. Values
are written as on the command line (`1e-3`, `true`, `synthetic`); commas separate values,
or semicolons when the list has one, for values that hold commas
(`--sweep='gatt.eval_turns=2,4;6,20'`: two values). A run is named by the last part of
each swept field (the whole field where two swept fields share it); two combinations whose
names would be the same (values that differ only in characters a directory name cannot
hold) get a short hash of their overrides appended, as does a name over 120 characters
(cut), so each has its own workdir.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    if "=" not in spec:
        raise ValueError(f"--sweep={spec!r}: expected FIELD=V1,V2,... (e.g. optimizer.learning_rate=1e-4,3e-4)")
    field, values = spec.split("=", 1)
    field = field.strip().removeprefix("--").removeprefix("config.")
    vals = [v.strip() for v in values.split(";" if ";" in values else ",") if v.strip()]
    if not field or not vals:
        raise ValueError(f"--sweep={spec!r}: needs a field and at least one value")
    if len(set(vals)) != len(vals):
        raise ValueError(f"--sweep={spec!r}: a value is listed twice")
    return field, vals


MAX_NAME = 120  # characters of a run's directory name before it is cut and hashed (filesystems allow 255)


def run_name(overrides: list[tuple[str, str]], whole: frozenset = frozenset()) -> str:
    """`optimizer.learning_rate=1e-3,model.n_layers=2` -> `learning_rate=1e-3_n_layers=2`:
    the last component of each field (the whole field for those in `whole`),
    filesystem-safe."""
    parts = [f"{field if field in whole else field.split('.')[-1]}={value}" for field, value in overrides]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", "_".join(parts)) or "base"


def unique_names(combos: list[list[tuple[str, str]]]) -> list[str]:
    """run_name of each combination; fields whose last components coincide are named
    whole (ppo.beta, dpo.beta), and names that collide or are too long get a hash of
    their overrides."""
    fields = [f for f, _ in combos[0]] if combos else []
    last = [f.split(".")[-1] for f in fields]
    whole = frozenset(f for f, end in zip(fields, last) if last.count(end) > 1)
    names = [run_name(c, whole) for c in combos]

    def tag(combo):
        return hashlib.sha1(repr(combo).encode()).hexdigest()[:6]

    return [name[:MAX_NAME] + "_" + tag(combo) if names.count(name) > 1 or len(name) > MAX_NAME else name
            for name, combo in zip(names, combos)]


def combinations(sweeps: list[tuple[str, list[str]]]) -> list[list[tuple[str, str]]]:
    fields = [f for f, _ in sweeps]
    if len(set(fields)) != len(fields):
        raise ValueError(f"a field is swept twice: {fields}")
    return [list(zip(fields, combo)) for combo in itertools.product(*(v for _, v in sweeps))]


def main_args(config: str, workdir: str, overrides: list[tuple[str, str]], extra: list[str]) -> list[str]:
    return [f"--config={config}", f"--workdir={workdir}", *extra, *(f"--config.{f}={v}" for f, v in overrides)]


RECORD = "sweep_run.json"  # in each run's directory: the command it was started with


def _recorded(cmd_args: list[str]) -> list[str]:
    """A run's command as recorded: its flags but its workdir (the directory it is in)."""
    return [a for a in cmd_args if not a.startswith("--workdir=")]


def check_runs(runs: list[tuple[str, str, list[str]]]) -> str:
    """Why the sweep cannot start ("" if it can): a combination whose settings a run
    would refuse, or a run directory begun with another command."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from llama_jax import cli
    from llama_jax.workdir import began, ran_past

    for name, workdir, cmd_args in runs:
        try:
            config = cli.check_run(cmd_args)
        except ValueError as e:
            return f"{name}: {e}"
        why = ran_past(workdir, config.total_steps, "the sweep")
        if why:
            return why
        record = os.path.join(workdir, RECORD)
        if os.path.exists(record) and began(workdir):  # one that failed before that is run anew
            with open(record) as f:
                before = json.load(f).get("args", [])
            now = _recorded(cmd_args)
            if before != now:
                differ = [a for a in now if a not in before] + [f"(not {a})" for a in before if a not in now]
                return (f"{workdir} was begun with other flags ({' '.join(differ)}): rerun the sweep with the flags "
                        "it began with, remove that directory, or use another --workdir")
    return ""


def run(cmd_args: list[str]) -> int:
    """One combination's run; SIGINT and SIGTERM to the sweep reach it (SIGTERM: it saves
    its step), and its exit code is returned; after a signal to the sweep, 130 (SIGINT)
    or 143 (SIGTERM), the signal the sweep got (the run itself always gets SIGTERM)."""
    # its own session: a terminal's Ctrl-C reaches the sweep alone, which stops the run with SIGTERM (it saves its
    # step); LLAMA_JAX_PARENT_PID: it gets SIGTERM too if the sweep dies (llama_jax.main.end_with_parent)
    proc = subprocess.Popen([sys.executable, "-m", "llama_jax.main", *cmd_args], start_new_session=True,
                            env={**os.environ, "LLAMA_JAX_PARENT_PID": str(os.getpid())})

    received = []

    def forward(signum, _frame):
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # a SIGINT can be swallowed by a callback; SIGTERM saves the step

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    from llama_jax.cli import exit_code

    return 128 + received[0] if received else exit_code(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="experiments/X.py:ARG")
    parser.add_argument("--workdir", required=True, help="root: one subdirectory per combination")
    parser.add_argument("--sweep", action="append", default=[], help="FIELD=V1,V2,... (repeatable)")
    parser.add_argument("--launcher", choices=("local", "print", "tpu_vm"), default="local")
    parser.add_argument("--tpu", default="llama-jax", help="TPU VM name for --launcher=tpu_vm")
    args = parser.parse_args(argv)
    for flag in extra:  # a --workdir there would put every combination in one workdir (absl takes -workdir too)
        name = flag.lstrip("-").split("=")[0]
        if flag.startswith("-") and name in ("workdir", "config"):
            parser.error(f"{flag.split('=')[0]} after --: give --{name} before -- (the sweep sets each run's)")
    try:
        combos = combinations([parse_sweep(s) for s in args.sweep])
    except ValueError as e:
        parser.error(str(e))
    names = unique_names(combos)
    runs = [(name, os.path.join(args.workdir, name), main_args(args.config, os.path.join(args.workdir, name), combo,
                                                                 extra)) for combo, name in zip(combos, names)]
    if args.launcher != "local":
        for _, _, cmd_args in runs:
            print(shlex.join(["python", "-m", "llama_jax.main", *cmd_args]) if args.launcher == "print" else
                  shlex.join(["launch/tpu_vm.sh", "run", args.tpu, "--", *cmd_args]))
        return 0
    problem = check_runs(runs)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    failed = []
    for i, (name, workdir, cmd_args) in enumerate(runs):
        if os.path.exists(os.path.join(workdir, "final_metrics.json")):
            print(f"[{i + 1}/{len(combos)}] {name}: finished before, skipped", flush=True)
            continue
        print(f"[{i + 1}/{len(combos)}] {name}", flush=True)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, RECORD), "w") as f:
            json.dump({"args": _recorded(cmd_args)}, f, indent=1)
        code = run(cmd_args)
        if code in (130, 143):
            print(f"sweep: stopped ({'Ctrl-C' if code == 130 else 'SIGTERM'}) in {name}; the same command resumes "
                  "it", file=sys.stderr)
            return code
        if code == 2:  # a bad override fails every combination the same way
            print(f"sweep: stopped; {name} was rejected (exit 2)", file=sys.stderr)
            return 2
        if code:
            failed.append(name)
            print(f"sweep: {name} failed with exit code {code}; continuing", file=sys.stderr, flush=True)
    if args.launcher == "local":
        print(f"compare: python -m llama_jax.compare {shlex.quote(args.workdir)}/*")
    if failed:
        print(f"sweep: {len(failed)} of {len(combos)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
