"""What the absl-based command lines (`llama_jax.main`, `launch/aot_compile.py`) share:
every bad flag or config override is one line on stderr and exit code 2, not a traceback."""

from __future__ import annotations

import argparse
import ast
import sys

from absl import flags


def parse_flags(argv: list[str], usage: str) -> list[str]:
    """absl's parser, with errors (unknown field, wrong type, a config file that raised)
    reported by `usage_error`."""
    rest, message = parse_into(argv, flags.FLAGS)
    if message is not None:
        usage_error(message, usage)
    return rest


def parse_into(argv: list[str], values) -> tuple[list[str] | None, str | None]:
    """Parses `argv` into the absl FlagValues `values`: (the arguments left, None), or
    (None, the error's one-line message: unknown field, wrong type, a config file that
    raised)."""
    missing = _missing_config_file(argv)
    if missing:
        return None, missing
    try:
        return values(argv), None
    except flags.Error as e:
        return None, str(e)
    except (KeyError, AttributeError, TypeError, ValueError, OSError) as e:  # raised by config overrides
        if isinstance(e, AttributeError) and e.args and isinstance(e.args[0], KeyError):
            e = e.args[0]  # a misspelt field of a config: ml_collections' KeyError inside an AttributeError
        return None, _unknown_field(e, argv) if isinstance(e, KeyError) else str(e.args[0]) if e.args else repr(e)


def _missing_config_file(argv: list[str]) -> str | None:
    """The error for a `--config=FILE[:ARG]` whose file does not exist (ml_collections
    raises it from the first override as a traceback), saying where the experiments are."""
    import os

    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith("--config=") else argv[i + 1] if a == "--config" and \
            i + 1 < len(argv) else None
        if value is None:
            continue
        path = value.rsplit(":", 1)[0] if ":" in value and not os.path.isfile(value) else value
        if not os.path.isfile(path):
            here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
            hint = f" (did you mean {here}? experiment paths are relative to where you run the command)" \
                if not os.path.isabs(path) and os.path.isfile(here) else ""
            return f"--config={value}: no such file {path}{hint}"
    return None


def _unknown_field(e: KeyError, argv: list[str]) -> str:
    """One line naming the override and its unknown field. ml_collections' KeyError holds
    the field's name quoted, sometimes quoted again around a "Did you mean" line."""
    text = str(e.args[0]) if e.args else ""
    while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        try:
            text = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            break
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    field = lines[0].strip("'\"") if lines else "?"
    hint = "; " + " ".join(lines[1:]).lower() if len(lines) > 1 else ""
    flag = next((a for a in argv if a.startswith("--config.") and field in a.split("=")[0].split(".")[1:]), "")
    return f"{flag + ': ' if flag else ''}the config has no field {field!r}{hint}"


def usage_error(message: str, usage: str) -> None:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):  # a config file raised: keep its own message
        lines = [lines[0].split("Traceback")[0].strip(), lines[-1]] if lines else []
    print("error: " + " ".join(line for line in lines if line), file=sys.stderr)
    print(usage, file=sys.stderr)
    sys.exit(2)


def config_of(argv: list[str], overrides: bool = False):
    """The ConfigDict `python -m llama_jax.main ARGV` (flags only) runs with, parsed as
    main parses it, without running anything; a ValueError with main's one-line message.
    The recipe and launch/sweep.py check every run's settings this way before the first.
    `overrides`: (config, the fields ARGV sets, {"total_steps": 30})."""
    from absl import logging  # noqa: F401 - defines absl's own flags (--verbosity, ...), which main also takes
    from ml_collections import config_flags

    own = set(flags.FLAGS) - {"config", "workdir"}  # absl's flags: main takes them; they set no config field
    args = ["main", *(a for a in argv if a.lstrip("-").split("=")[0].removeprefix("no") not in own)]
    values = flags.FlagValues()  # sys_argv: the overrides it defines as flags are those of this command
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=args)
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    _, message = parse_into(args, values)
    if message is None:
        try:
            config = values["config"].value
            return (config, config_flags.get_override_values(values["config"])) if overrides else config
        except Exception as e:  # noqa: BLE001 - a config file that raised: ml_collections' several types
            message = str(e)
    raise ValueError(message)


def check_run(argv: list[str]):
    """`config_of(argv)` checked as a run checks it at its start (`train.check_config`,
    the stage's own `check`); a ValueError names what a run would refuse."""
    from llama_jax.stages import STAGES
    from llama_jax.train import RunError, check_config, check_overrides

    config, overrides = config_of(argv, overrides=True)
    if config.stage not in STAGES:
        raise ValueError(f"config.stage: unknown stage {config.stage!r}; known stages: {sorted(STAGES)}")
    try:
        check_config(config, STAGES[config.stage]())
        check_overrides(config, STAGES[config.stage](), overrides)
    except RunError as e:
        raise ValueError(str(e)) from None
    return config


def exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except a None default (the option's help says
    what leaving it out means): for the benchmark scripts."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)
