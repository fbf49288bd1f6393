"""What the absl-based command lines (`llama_jax.main`, `launch/aot_compile.py`) share:
every bad flag or config override is one line on stderr and exit code 2, not a traceback."""

from __future__ import annotations

import sys

from absl import flags


def parse_flags(argv: list[str], usage: str) -> list[str]:
    """absl's parser, with errors (unknown field, wrong type, a config file that raised)
    reported by `usage_error`."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except (KeyError, AttributeError, TypeError, ValueError) as e:  # raised by config overrides
        message = str(e.args[0]) if e.args else repr(e)
    usage_error(message, usage)


def usage_error(message: str, usage: str) -> None:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):  # a config file raised: keep its own message
        lines = [lines[0].split("Traceback")[0].strip(), lines[-1]] if lines else []
    print("error: " + " ".join(line for line in lines if line), file=sys.stderr)
    print(usage, file=sys.stderr)
    sys.exit(2)
