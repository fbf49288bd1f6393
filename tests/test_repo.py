"""The repository's promises to a new user: the README's commands and CI agree, and the
summary command the README shows works."""

import pathlib
import re

import pytest

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


def test_gpu_benchmark_script_runs_its_parts_at_smoke_size(tmp_path):
    """benchmarks/gpu_mfu.py is run on a lent GPU for minutes at a time, so a broken script
    costs a lease: its attention check and two train runs (the einsums, and the cuDNN call
    without the segment mask, which on a CPU runs jax.nn's XLA kernel) run here with tiny
    shapes (`--smoke`), and each writes its JSON line."""
    import json
    import subprocess
    import sys

    from procs import env

    root = pathlib.Path(__file__).resolve().parent.parent
    out = tmp_path / "results.jsonl"
    script = str(root / "benchmarks" / "gpu_mfu.py")
    train_args = ["--part=train", "--batch=2", "--seq=32", "--layers=2", "--steps=2"]
    for part in (["--part=check"], train_args + ["--attention=xla"],
                 train_args + ["--attention=cudnn", "--mask=causal"]):  # smoke: jax.nn's XLA kernel, unmasked
        e = dict(env(), PYTHONPATH=str(root))
        proc = subprocess.run([sys.executable, script, *part, "--smoke", f"--out={out}"], env=e,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    check, train, causal = [json.loads(line) for line in out.read_text().splitlines()]
    # (on a CPU both sides are the einsums: the row says so rather than reporting a cuDNN loss)
    assert check["part"] == "check" and check["loss_xla"] == check["loss_xla_again"] > 0 and "loss_cudnn" not in check
    assert train["part"] == "train" and train["layers"] == 2 and train["batch"] == 2 and train["seq"] == 32
    assert train["tokens_per_s"] > 0 and 0 < train["mfu_spec"] < 1
    assert train["loss_last"] < train["loss_first"]  # three optimizer steps on one batch
    # The mask-free run (one unpadded segment a row) computes the same loss through jax.nn's kernel
    assert (causal["attention"], causal["mask"]) == ("cudnn", "causal")
    assert causal["loss_first"] == pytest.approx(train["loss_first"], rel=1e-2)
    assert train["device"] and train["argv"] == train_args + ["--attention=xla", "--smoke", f"--out={out}"]
    # without --smoke, on a machine with no GPU: refused at once (its 8192^3 matmuls would take minutes a call)
    proc = subprocess.run([sys.executable, script, "--part=peak"], env=dict(env(), PYTHONPATH=str(root)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and "error: no GPU visible to jax (device: cpu)" in proc.stderr
    # --help: what the script does, each option's default (a None default says nothing)
    helped = subprocess.run([sys.executable, script, "--help"], env=dict(env(), PYTHONPATH=str(root)),
                            capture_output=True, text=True, timeout=60).stdout
    helped = " ".join(helped.split())
    assert "GPU benchmark (issue 9)" in helped and "(default: 4096)" in helped and "(default: None)" not in helped
    assert "(default: the" not in helped  # one default a flag


def test_benchmark_scripts_say_bad_input_in_one_line(tmp_path):
    """data_throughput.py with a tokenizer or a source that is not there: one error line
    naming it, not a traceback; the benchmark scripts' --help shows no '(default: None)'."""
    import subprocess
    import sys

    from procs import env

    root = pathlib.Path(__file__).resolve().parent.parent
    script = str(root / "benchmarks" / "data_throughput.py")
    e = dict(env(), PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, script, f"--tokenizer={tmp_path / 'none.model'}"], env=e,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none.model'}: tokenizer model not found"], proc.stderr
    for name in ("data_throughput.py", "train_throughput.py", "decode_throughput.py"):
        helped = subprocess.run([sys.executable, str(root / "benchmarks" / name), "--help"], env=e,
                                capture_output=True, text=True, timeout=60).stdout
        assert "(default: None)" not in helped and "(default: " in helped, name


def test_the_readmes_python_example_runs(reference_run, tmp_path):
    """The README's "From Python" example, run as written on a small run (its path
    replaced): the library calls it shows exist and take the arguments it gives."""
    import subprocess
    import sys

    from procs import env

    text = (ROOT / "README.md").read_text()
    section = text[text.index("### From Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "generate.load_for_inference(" in code and "evaluate.loglikelihood(" in code
    script = tmp_path / "example.py"
    script.write_text(code.replace('"runs/tiny"', repr(reference_run[0]))
                      + "\nassert len(texts) == 2 and logits.shape[0] == 1 and lp < 0 and ppl['perplexity'] > 1\n"
                      + "print('ok')\n")
    out = subprocess.run([sys.executable, str(script)], env={**env(), "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
