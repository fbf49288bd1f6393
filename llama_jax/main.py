"""The one entry point for every run:

    python -m llama_jax.main --config=experiments/X.py:ARG --workdir=DIR [--config.a.b=value ...]

Rerunning the same command in the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config: experiments/X.py:ARG",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the tokenizer")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str) -> dict:
    from llama_jax.stages import STAGES
    from llama_jax.train import RunError
    from llama_jax.train import run as train_run

    if config.stage not in STAGES:
        raise RunError(f"config.stage: unknown stage {config.stage!r}; known stages: {sorted(STAGES)}")
    return train_run(config, workdir, STAGES[config.stage]())


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
        import logging as py_logging

        class _QuietOrbax(py_logging.Filter):  # its warnings describe its own defaults, not problems
            def filter(self, record):
                return record.levelno >= py_logging.ERROR or "orbax" not in record.pathname

        logging.get_absl_handler().addFilter(_QuietOrbax())
    from llama_jax.checkpoint import CheckpointError
    from llama_jax.data.sources import DataError
    from llama_jax.sharding import MeshError
    from llama_jax.tokenizer import TokenizerError
    from llama_jax.train import RunError

    try:
        config = _CONFIG.value
        config.stage  # noqa: B018 - a file that failed to load raises on first use
    except Exception as e:  # noqa: BLE001 - ml_collections raises several types
        _usage_error(str(e))
    try:
        run(config, _WORKDIR.value)
    except (RunError, DataError, MeshError, TokenizerError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with every bad flag or override (unknown field, wrong type) as one
    line on stderr and exit code 2, instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except (KeyError, AttributeError, TypeError, ValueError) as e:  # raised by config overrides
        message = str(e.args[0]) if e.args else repr(e)
    _usage_error(message)


def _usage_error(message: str) -> None:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):  # a config file raised: keep its own message
        lines = [lines[0].split("Traceback")[0].strip(), lines[-1]] if lines else []
    print("error: " + " ".join(line for line in lines if line), file=sys.stderr)
    print("usage: python -m llama_jax.main --config=experiments/X.py:ARG --workdir=DIR [--config.a.b=value ...]",
          file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
