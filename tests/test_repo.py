"""The repository's promises to a new user: the README's commands and CI agree, and the
summary command the README shows works."""

import pathlib
import re

from llama_jax import summary

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, re.S)
    lines = [line.strip() for b in blocks for line in b.splitlines()]
    return [c for c in lines if c and not c.startswith("#")][:2]


def test_readme_starts_with_the_main_job_then_the_tests():
    main_cmd, test_cmd = readme_commands()
    assert "python -m llama_jax.main --config=experiments/pretrain.py:tiny" in main_cmd
    assert "pytest" in test_cmd


def test_ci_runs_the_readme_test_command():
    test_cmd = readme_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines


def test_summary_command(capsys):
    assert summary.main(["--preset=tiny"]) == 0
    out = capsys.readouterr().out
    assert "869,504" in out and "finite=True" in out and "(2, 64, 512) float32" in out
    assert summary.main(["--preset=70b"]) == 0
    assert "68,976,648,192" in capsys.readouterr().out


def test_summary_reports_a_bad_directory(tmp_path, capsys):
    assert summary.main([f"--hf={tmp_path}"]) == 2
    assert f"{tmp_path}/config.json" in capsys.readouterr().err
