"""The one entry point for every run:

    python -m llama_jax.main --config=experiments/X.py:ARG --workdir=DIR [--config.a.b=value ...]

Rerunning the same command in the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from llama_jax import cli, distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config: experiments/X.py:ARG",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the tokenizer")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str, overrides: dict | None = None) -> dict:
    """Runs `config` (an experiment's `get_config(ARG)`, changed as one likes) in `workdir`,
    as `python -m llama_jax.main` does; returns the final metrics. `overrides`: the fields
    changed from the experiment's config ({"model.max_seq_len": 1024}), checked against
    `init_from`'s model as the command line's are; the command line's own when it parsed
    them. From Python without them, config.model fields that `init_from`'s model makes
    unused are named in a note."""
    from llama_jax.stages import STAGES
    from llama_jax.train import RunError
    from llama_jax.train import run as train_run

    if config.stage not in STAGES:
        raise RunError(f"config.stage: unknown stage {config.stage!r}; known stages: {sorted(STAGES)}")
    if overrides is None and flags.FLAGS.is_parsed():
        overrides = config_flags.get_override_values(flags.FLAGS["config"])
    return train_run(config, workdir, STAGES[config.stage](), overrides=overrides)


def end_with_parent() -> None:
    """With LLAMA_JAX_PARENT_PID (the recipe sets it for its stages), a SIGTERM when that
    process dies, even by SIGKILL (Linux): the run saves its step and exits, as on a
    scheduler's notice, rather than run on without the recipe that would resume it."""
    parent = os.environ.get("LLAMA_JAX_PARENT_PID", "")
    if not parent.isdigit():
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != int(parent):  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    end_with_parent()
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
        from llama_jax.checkpoint import quiet_orbax

        quiet_orbax()
    from llama_jax.checkpoint import CheckpointError
    from llama_jax.data.sources import DataError
    from llama_jax.sharding import MeshError
    from llama_jax.tokenizer import TokenizerError
    from llama_jax.train import Preempted, RunError

    try:
        config = _CONFIG.value
        config.stage  # noqa: B018 - a file that failed to load raises on first use
    except Exception as e:  # noqa: BLE001 - ml_collections raises several types
        _usage_error(str(e))
    try:
        distributed.initialize()  # a no-op unless a launcher describes a multi-process job
    except ValueError as e:  # a malformed LLAMA_JAX_LOCAL_DEVICE_IDS
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        run(config, _WORKDIR.value)
    except Preempted as e:
        _exit(str(e), 143)
    except (RunError, DataError, MeshError, TokenizerError, CheckpointError) as e:
        _exit(f"error: {e}", 1)
    except KeyboardInterrupt:
        from llama_jax import train

        if train.PHASE == "preparing":  # a stage's sampling or data building, which is not checkpointed
            _exit("interrupted while the stage made its data (sampling, scoring), before training; rerunning the "
                  "same command makes it again", 130)
        _exit("interrupted; rerun the same command to resume from the last checkpoint", 130)
    except Exception as e:
        if not distributed.is_multiprocess():
            raise
        if _peer_gone(e):  # one line, not a 40-line traceback: the process that failed first said why
            lines = str(e).strip().splitlines() or [""]
            _exit(f"error: a collective with the job's other processes failed ({type(e).__name__}: "
                  f"{lines[0][:300]}): another process failed first (its error says why), or the processes cannot "
                  "reach each other (the coordinator address, a firewall)", 1)
        traceback.print_exc()
        _exit("", 1)


# what JAX's runtime says when a peer process of the job is gone (gloo collectives, the coordination service)
PEER_GONE = ("gloo", "coordinationservice", "connection closed by peer", "connection reset by peer",
             "collective mismatch")


def _peer_gone(e: Exception) -> bool:
    # process_allgather's failures reach Python as a ValueError ("UNKNOWN: Gloo AllGather failed ...")
    return (type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError", "ValueError", "RuntimeError")
            and any(m in str(e).lower() for m in PEER_GONE))


def _exit(message: str, code: int) -> None:
    """Exits with `message` on stderr. In a multi-process job, at once: a normal exit would
    wait at JAX's shutdown barrier for processes that are still waiting for this one."""
    if message:
        print(message, file=sys.stderr, flush=True)
    if distributed.is_multiprocess():
        sys.stdout.flush()
        if distributed.is_lead():  # the lead hosts the job's coordination service: the processes
            time.sleep(LEAD_EXIT_DELAY_S)  # that fail alike go first, not killed by its end mid-exit
        os._exit(code)
    sys.exit(code)


LEAD_EXIT_DELAY_S = 3.0


USAGE = "usage: python -m llama_jax.main --config=experiments/X.py:ARG --workdir=DIR [--config.a.b=value ...]"


def parse_flags(argv: list[str]) -> list[str]:
    return cli.parse_flags(argv, USAGE)


def _usage_error(message: str) -> None:
    cli.usage_error(message, USAGE)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
