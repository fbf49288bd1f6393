"""Ablations from config overrides: every combination of the swept values, one workdir
each, named by its overrides.

    python launch/sweep.py --config=experiments/pretrain.py:tiny --workdir=runs/lr_sweep \\
        --sweep='optimizer.learning_rate=1e-3,3e-3' --sweep='model.n_layers=2,4' \\
        [--launcher=local|print|tpu_vm] [-- --config.total_steps=200 ...]
    python -m llama_jax.compare runs/lr_sweep/*

`--launcher=local` (default) runs the combinations one after another on this machine
(a combination whose workdir already has `final_metrics.json` is skipped, so a sweep that
was interrupted continues where it stopped; the interrupted run itself resumes from its
checkpoint). `print` prints each `python -m llama_jax.main` command; `tpu_vm` prints one
`launch/tpu_vm.sh run` command per combination for the TPU VM named by `--tpu`: `run`
starts its run in the background and returns, and a slice runs one run at a time (its
log is `logs/run.log`), so start each when the one before has finished, or give each
its own slice (edit the printed names). Flags after `--` are passed to every run. Values
are written as on the command line (`1e-3`, `true`, `synthetic`); commas separate values,
so a value cannot contain one. Two combinations whose names would be the same (values
that differ only in characters a directory name cannot hold) get a short hash of their
overrides appended, so each has its own workdir.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import re
import shlex
import subprocess
import sys


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    if "=" not in spec:
        raise ValueError(f"--sweep={spec!r}: expected FIELD=V1,V2,... (e.g. optimizer.learning_rate=1e-4,3e-4)")
    field, values = spec.split("=", 1)
    field = field.strip().removeprefix("--").removeprefix("config.")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not field or not vals:
        raise ValueError(f"--sweep={spec!r}: needs a field and at least one value")
    if len(set(vals)) != len(vals):
        raise ValueError(f"--sweep={spec!r}: a value is listed twice")
    return field, vals


def run_name(overrides: list[tuple[str, str]]) -> str:
    """`optimizer.learning_rate=1e-3,model.n_layers=2` -> `learning_rate=1e-3_n_layers=2`:
    the last component of each field, filesystem-safe."""
    parts = [f"{field.split('.')[-1]}={value}" for field, value in overrides]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", "_".join(parts)) or "base"


def unique_names(combos: list[list[tuple[str, str]]]) -> list[str]:
    """run_name of each combination; names that collide get a hash of their overrides."""
    names = [run_name(c) for c in combos]
    return [name + "_" + hashlib.sha1(repr(combo).encode()).hexdigest()[:6] if names.count(name) > 1 else name
            for name, combo in zip(names, combos)]


def combinations(sweeps: list[tuple[str, list[str]]]) -> list[list[tuple[str, str]]]:
    fields = [f for f, _ in sweeps]
    if len(set(fields)) != len(fields):
        raise ValueError(f"a field is swept twice: {fields}")
    return [list(zip(fields, combo)) for combo in itertools.product(*(v for _, v in sweeps))]


def main_args(config: str, workdir: str, overrides: list[tuple[str, str]], extra: list[str]) -> list[str]:
    return [f"--config={config}", f"--workdir={workdir}", *extra, *(f"--config.{f}={v}" for f, v in overrides)]


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
    for flag in extra:  # a --workdir there would put every combination in one workdir
        if flag.split("=")[0] in ("--workdir", "--config"):
            parser.error(f"{flag.split('=')[0]} after --: give it before -- (the sweep sets each run's)")
    try:
        combos = combinations([parse_sweep(s) for s in args.sweep])
    except ValueError as e:
        parser.error(str(e))
    names = unique_names(combos)
    failed = []
    for i, (combo, name) in enumerate(zip(combos, names)):
        workdir = os.path.join(args.workdir, name)
        cmd_args = main_args(args.config, workdir, combo, extra)
        if args.launcher == "print":
            print(shlex.join(["python", "-m", "llama_jax.main", *cmd_args]))
            continue
        if args.launcher == "tpu_vm":
            print(shlex.join(["launch/tpu_vm.sh", "run", args.tpu, "--", *cmd_args]))
            continue
        if os.path.exists(os.path.join(workdir, "final_metrics.json")):
            print(f"[{i + 1}/{len(combos)}] {name}: finished before, skipped", flush=True)
            continue
        print(f"[{i + 1}/{len(combos)}] {name}", flush=True)
        code = subprocess.call([sys.executable, "-m", "llama_jax.main", *cmd_args])
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
